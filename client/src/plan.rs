//! Deterministic shuffle plans: which objects each (rank, worker) reads in
//! an epoch, and in what order.
//!
//! The dataset's objects are numbered 0..N in listing order (sorted by
//! path), which is also the order ingest lays them out on the devices, so
//! nearby numbers are nearby on disk. One epoch's global order is built in
//! three steps, all derived only from `(seed, epoch)`:
//!
//! 1. **Order.** With `shuffle`, 0..N is permuted uniformly (the default,
//!    `block_size` 1). Listing order is path order, so on class-sorted data
//!    (ImageNet's `train/<class>/...` layout) neighbours share a class, and
//!    any shuffle that keeps neighbours together biases batches: with
//!    blocks of 64, a batch of 256 from 100 classes of 120 held about 22
//!    classes, against about 92 for a uniform shuffle. Device reads stay
//!    efficient by other means: the loader lays each batch out in disk
//!    order and hints the batches ahead, and storaged sorts and merges the
//!    reads of a window by (device, offset). Optionally (`block_size` > 1),
//!    0..N is cut into blocks of `block_size` consecutive objects, the
//!    blocks are permuted and the objects inside each block too: clustered
//!    reads for devices that need them, at the cost of that bias.
//! 2. **Ranks.** The global order is made a multiple of `world_size`, by
//!    dropping the tail (`DropLast`) or by repeating its head (`Pad`, as
//!    PyTorch's `DistributedSampler` does), and cut into `world_size` equal
//!    contiguous parts. Every rank gets the same length, so DDP's collective
//!    calls never wait on a rank that ran out.
//! 3. **Workers.** A rank's part is dealt round-robin to its `num_workers`
//!    data-loader workers (element `i` to worker `i % num_workers`), the way
//!    PyTorch's DataLoader interleaves its workers' batches.
//!
//! The random numbers come from SplitMix64 and Lemire's unbiased bounded
//! sampling, written out here rather than taken from a crate, so that a plan
//! never changes with a dependency upgrade: the same `(seed, epoch)` gives
//! the same order in every release and in every language that implements
//! these forty lines.
//!
//! **Resume.** A [`PlanState`] records, per worker, how many of its samples
//! were consumed. Resuming removes exactly those samples from the rank's
//! part and deals the remainder to the workers again, so the worker count
//! may change between the save and the resume.

use serde::{Deserialize, Serialize};

/// Errors in a plan's specification or resume state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("world_size must be at least 1")]
    NoRanks,
    #[error("rank {rank} is out of range for world_size {world_size}")]
    RankOutOfRange { rank: u32, world_size: u32 },
    #[error("num_workers must be at least 1")]
    NoWorkers,
    #[error("worker {worker} is out of range for num_workers {num_workers}")]
    WorkerOutOfRange { worker: u32, num_workers: u32 },
    #[error("block_size must be at least 1")]
    ZeroBlockSize,
    #[error("the dataset is empty, so a padded plan has nothing to repeat")]
    EmptyDataset,
    #[error("resume state is for epoch {state}, the plan is for epoch {spec}")]
    EpochMismatch { state: u64, spec: u64 },
    #[error("resume state has {positions} worker positions, but says num_workers {num_workers}")]
    StateShape { positions: usize, num_workers: u32 },
    #[error(
        "resume state says worker {worker} consumed {position} samples, but it had only {available}"
    )]
    PositionPastEnd {
        worker: usize,
        position: u64,
        available: u64,
    },
}

/// What to do with the samples that do not divide evenly among the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanTail {
    /// Leave out the last `N % world_size` samples of the epoch's order.
    DropLast,
    /// Repeat samples from the start of the epoch's order to fill up.
    Pad,
}

/// Everything that determines one (rank, worker)'s sequence for an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSpec {
    pub seed: u64,
    pub epoch: u64,
    pub rank: u32,
    pub world_size: u32,
    pub worker: u32,
    pub num_workers: u32,
    pub shuffle: bool,
    /// Consecutive objects shuffled as a unit; 1 (the default) shuffles
    /// objects freely, which keeps batches unbiased on class-sorted data.
    pub block_size: u32,
    pub tail: PlanTail,
}

impl Default for PlanSpec {
    fn default() -> Self {
        Self {
            seed: 0,
            epoch: 0,
            rank: 0,
            world_size: 1,
            worker: 0,
            num_workers: 1,
            shuffle: true,
            block_size: 1,
            tail: PlanTail::Pad,
        }
    }
}

impl PlanSpec {
    fn validate(&self) -> Result<(), PlanError> {
        if self.world_size == 0 {
            return Err(PlanError::NoRanks);
        }
        if self.rank >= self.world_size {
            return Err(PlanError::RankOutOfRange {
                rank: self.rank,
                world_size: self.world_size,
            });
        }
        if self.num_workers == 0 {
            return Err(PlanError::NoWorkers);
        }
        if self.worker >= self.num_workers {
            return Err(PlanError::WorkerOutOfRange {
                worker: self.worker,
                num_workers: self.num_workers,
            });
        }
        if self.block_size == 0 {
            return Err(PlanError::ZeroBlockSize);
        }
        Ok(())
    }
}

/// How far each worker of one rank got in an epoch; serialize it with a
/// checkpoint (serde, e.g. JSON) and pass it back to resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanState {
    pub epoch: u64,
    pub num_workers: u32,
    /// Samples consumed by worker `i` from the sequence it was dealt
    /// (under this state's `num_workers`, after any earlier resume).
    pub positions: Vec<u64>,
    /// The state this one resumed from, if any: its consumed samples are
    /// removed before `positions` apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<Box<PlanState>>,
}

impl PlanState {
    /// A fresh state: nothing consumed yet.
    pub fn start(epoch: u64, num_workers: u32) -> Self {
        Self {
            epoch,
            num_workers,
            positions: vec![0; num_workers as usize],
            resumed_from: None,
        }
    }

    /// The state for continuing from `self` with `num_workers` workers.
    pub fn resume_with(self, num_workers: u32) -> Self {
        Self {
            epoch: self.epoch,
            num_workers,
            positions: vec![0; num_workers as usize],
            resumed_from: Some(Box::new(self)),
        }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and fixed forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, epoch: u64, stream: u64) -> Self {
        let mut mix = Self(seed ^ 0x5354_4f52_4147_4544); // "STORAGED"
        let a = mix.next_u64() ^ epoch;
        let mut mix = Self(a);
        let b = mix.next_u64() ^ stream;
        Self(b)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..bound (bound > 0), without modulo bias (Lemire 2019).
    fn below(&mut self, bound: u64) -> u64 {
        let mut m = u128::from(self.next_u64()) * u128::from(bound);
        if (m as u64) < bound {
            let threshold = bound.wrapping_neg() % bound;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(bound);
            }
        }
        (m >> 64) as u64
    }

    /// Fisher-Yates.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The epoch's global order of `object_count` objects (step 1).
pub fn epoch_order(object_count: u64, spec: &PlanSpec) -> Vec<u64> {
    let block = u64::from(spec.block_size.max(1));
    let block_count = object_count.div_ceil(block);
    let mut blocks: Vec<u64> = (0..block_count).collect();
    let mut order = Vec::with_capacity(object_count as usize);
    if !spec.shuffle {
        order.extend(0..object_count);
        return order;
    }
    SplitMix64::new(spec.seed, spec.epoch, u64::MAX).shuffle(&mut blocks);
    if block == 1 {
        // The permutation of single-object blocks is the order.
        return blocks;
    }
    for b in blocks {
        let start = order.len();
        order.extend(b * block..((b + 1) * block).min(object_count));
        // Each block gets its own stream, so its inner order does not
        // depend on where the block landed.
        SplitMix64::new(spec.seed, spec.epoch, b).shuffle(&mut order[start..]);
    }
    order
}

/// The samples rank `spec.rank` reads in the epoch, before the split among
/// workers (steps 1 and 2). Every rank's sequence has the same length.
pub fn rank_sequence(object_count: u64, spec: &PlanSpec) -> Result<Vec<u64>, PlanError> {
    spec.validate()?;
    let world = u64::from(spec.world_size);
    let per_rank = match spec.tail {
        PlanTail::DropLast => object_count / world,
        PlanTail::Pad => {
            if object_count == 0 {
                return Err(PlanError::EmptyDataset);
            }
            object_count.div_ceil(world)
        }
    };
    let order = epoch_order(object_count, spec);
    let start = u64::from(spec.rank) * per_rank;
    Ok((start..start + per_rank)
        .map(|i| order[(i % object_count.max(1)) as usize])
        .collect())
}

/// Deals `sequence` round-robin to `num_workers` and returns worker
/// `worker`'s share.
fn deal(sequence: &[u64], num_workers: u32, worker: u32) -> Vec<u64> {
    sequence
        .iter()
        .skip(worker as usize)
        .step_by(num_workers as usize)
        .copied()
        .collect()
}

/// What remains of a rank's sequence after the samples `state` (and the
/// states it resumed from) consumed.
fn remaining(mut sequence: Vec<u64>, state: &PlanState) -> Result<Vec<u64>, PlanError> {
    if let Some(earlier) = &state.resumed_from {
        if earlier.epoch != state.epoch {
            return Err(PlanError::EpochMismatch {
                state: earlier.epoch,
                spec: state.epoch,
            });
        }
        sequence = remaining(sequence, earlier)?;
    }
    let workers = state.num_workers as usize;
    if workers == 0 || state.positions.len() != workers {
        return Err(PlanError::StateShape {
            positions: state.positions.len(),
            num_workers: state.num_workers,
        });
    }
    for (worker, &position) in state.positions.iter().enumerate() {
        let available = sequence.len().saturating_sub(worker).div_ceil(workers) as u64;
        if position > available {
            return Err(PlanError::PositionPastEnd {
                worker,
                position,
                available,
            });
        }
    }
    // Element i went to worker i % workers as its (i / workers)-th sample.
    Ok(sequence
        .into_iter()
        .enumerate()
        .filter(|(i, _)| (i / workers) as u64 >= state.positions[i % workers])
        .map(|(_, s)| s)
        .collect())
}

/// One (rank, worker)'s object indices for the epoch, in read order,
/// starting after what `resume` says was already consumed.
pub fn worker_sequence(
    object_count: u64,
    spec: &PlanSpec,
    resume: Option<&PlanState>,
) -> Result<Vec<u64>, PlanError> {
    let mut sequence = rank_sequence(object_count, spec)?;
    if let Some(state) = resume {
        if state.epoch != spec.epoch {
            return Err(PlanError::EpochMismatch {
                state: state.epoch,
                spec: spec.epoch,
            });
        }
        sequence = remaining(sequence, state)?;
    }
    Ok(deal(&sequence, spec.num_workers, spec.worker))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn spec(world_size: u32, num_workers: u32, block_size: u32, tail: PlanTail) -> PlanSpec {
        PlanSpec {
            seed: 42,
            epoch: 3,
            world_size,
            num_workers,
            block_size,
            tail,
            ..PlanSpec::default()
        }
    }

    /// Every (rank, worker)'s sequence of one epoch.
    fn all(n: u64, base: &PlanSpec) -> Vec<Vec<Vec<u64>>> {
        (0..base.world_size)
            .map(|rank| {
                (0..base.num_workers)
                    .map(|worker| {
                        let s = PlanSpec {
                            rank,
                            worker,
                            ..*base
                        };
                        worker_sequence(n, &s, None).unwrap()
                    })
                    .collect()
            })
            .collect()
    }

    fn counts(seqs: &[Vec<Vec<u64>>]) -> BTreeMap<u64, u64> {
        let mut c = BTreeMap::new();
        for s in seqs.iter().flatten().flatten() {
            *c.entry(*s).or_insert(0) += 1;
        }
        c
    }

    // Guards against a change of the random number stream: plans saved by
    // one release must replay identically in the next.
    #[test]
    fn the_order_is_pinned() {
        let s = spec(1, 1, 4, PlanTail::Pad);
        let mut rng = SplitMix64(0);
        // Reference values of SplitMix64 seeded with 0.
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(epoch_order(10, &s), vec![8, 9, 5, 4, 7, 6, 2, 1, 0, 3]);
    }

    /// Mean distinct classes per batch of `batch` over one epoch of
    /// `classes` class-sorted classes of `per_class` objects, as one rank's
    /// DataLoader with `workers` workers sees them.
    fn classes_per_batch(block_size: u32, classes: u64, per_class: u64, batch: usize) -> f64 {
        let n = classes * per_class;
        let workers = 4;
        let mut sizes = Vec::new();
        for worker in 0..workers {
            let s = PlanSpec {
                seed: 11,
                epoch: 0,
                num_workers: workers,
                worker,
                block_size,
                ..PlanSpec::default()
            };
            let seq = worker_sequence(n, &s, None).unwrap();
            for chunk in seq.chunks(batch) {
                let distinct: std::collections::BTreeSet<u64> =
                    chunk.iter().map(|i| i / per_class).collect();
                sizes.push(distinct.len() as f64);
            }
        }
        sizes.iter().sum::<f64>() / sizes.len() as f64
    }

    // Guards against the default shuffle biasing batches on class-sorted
    // data (blocks of 64 neighbours gave ~22 classes per batch of 256 where
    // a uniform shuffle gives ~92): the default must stay within 10% of
    // uniform sampling's expectation.
    #[test]
    fn default_batches_hold_as_many_classes_as_a_uniform_shuffle() {
        let (classes, per_class, batch) = (100u64, 120u64, 256usize);
        // Expected distinct classes in `batch` draws without replacement:
        // classes * (1 - P(a class is never drawn)).
        let n = (classes * per_class) as f64;
        let mut never = 1.0;
        for k in 0..batch {
            never *= (n - per_class as f64 - k as f64) / (n - k as f64);
        }
        let uniform = classes as f64 * (1.0 - never);
        let default = classes_per_batch(PlanSpec::default().block_size, classes, per_class, batch);
        assert!(
            (default - uniform).abs() <= 0.1 * uniform,
            "default shuffle: {default:.1} classes per batch, uniform {uniform:.1}"
        );
        // Block shuffle stays available, and is as biased as reported.
        let blocked = classes_per_batch(64, classes, per_class, batch);
        assert!(blocked < 0.5 * uniform, "blocks of 64: {blocked:.1}");
    }

    #[test]
    fn unshuffled_plan_is_listing_order() {
        let s = PlanSpec {
            shuffle: false,
            ..spec(2, 2, 8, PlanTail::DropLast)
        };
        assert_eq!(worker_sequence(9, &s, None).unwrap(), vec![0, 2]);
        let s1 = PlanSpec {
            rank: 1,
            worker: 1,
            ..s
        };
        assert_eq!(worker_sequence(9, &s1, None).unwrap(), vec![5, 7]);
    }

    #[test]
    fn bad_specs_are_named() {
        let s = spec(2, 2, 4, PlanTail::Pad);
        let e = |s: PlanSpec| worker_sequence(10, &s, None).unwrap_err();
        assert_eq!(e(PlanSpec { world_size: 0, ..s }), PlanError::NoRanks);
        assert_eq!(
            e(PlanSpec { rank: 2, ..s }),
            PlanError::RankOutOfRange {
                rank: 2,
                world_size: 2
            }
        );
        assert_eq!(
            e(PlanSpec {
                num_workers: 0,
                ..s
            }),
            PlanError::NoWorkers
        );
        assert_eq!(
            e(PlanSpec { worker: 5, ..s }),
            PlanError::WorkerOutOfRange {
                worker: 5,
                num_workers: 2
            }
        );
        assert_eq!(e(PlanSpec { block_size: 0, ..s }), PlanError::ZeroBlockSize);
        assert_eq!(
            worker_sequence(0, &s, None).unwrap_err(),
            PlanError::EmptyDataset
        );
        let wrong_epoch = PlanState::start(9, 2);
        assert_eq!(
            worker_sequence(10, &s, Some(&wrong_epoch)).unwrap_err(),
            PlanError::EpochMismatch { state: 9, spec: 3 }
        );
        let mut past_end = PlanState::start(3, 2);
        past_end.positions[1] = 4;
        assert!(matches!(
            worker_sequence(10, &s, Some(&past_end)).unwrap_err(),
            PlanError::PositionPastEnd {
                worker: 1,
                position: 4,
                available: 2
            }
        ));
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut state = PlanState::start(7, 3);
        state.positions = vec![4, 4, 3];
        let state = state.resume_with(2);
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<PlanState>(&json).unwrap(), state);
    }

    fn tail_strategy() -> impl Strategy<Value = PlanTail> {
        prop_oneof![Just(PlanTail::DropLast), Just(PlanTail::Pad)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        // Exactly-once coverage (DropLast: at most once, all but fewer than
        // world_size; Pad: all at least once, repeats fewer than
        // world_size) and equal lengths on every rank.
        #[test]
        fn covers_every_sample_with_equal_rank_lengths(
            n in 1u64..600, world in 1u32..6, workers in 1u32..5,
            block in 1u32..40, tail in tail_strategy(), shuffle: bool,
        ) {
            let s = PlanSpec { shuffle, ..spec(world, workers, block, tail) };
            let seqs = all(n, &s);
            let lens: Vec<usize> = seqs.iter().map(|r| r.iter().map(Vec::len).sum()).collect();
            prop_assert!(lens.windows(2).all(|w| w[0] == w[1]), "rank lengths {:?}", lens);
            for rank in &seqs {
                let worker_lens: Vec<usize> = rank.iter().map(Vec::len).collect();
                let (lo, hi) = (worker_lens.iter().min().unwrap(), worker_lens.iter().max().unwrap());
                prop_assert!(hi - lo <= 1, "worker lengths {:?}", worker_lens);
            }
            let c = counts(&seqs);
            let total: u64 = c.values().sum();
            prop_assert!(c.keys().all(|&k| k < n));
            match tail {
                PlanTail::DropLast => {
                    prop_assert!(c.values().all(|&v| v == 1));
                    prop_assert_eq!(total, n - n % u64::from(world));
                }
                PlanTail::Pad => {
                    prop_assert_eq!(c.len() as u64, n);
                    prop_assert_eq!(total, n.div_ceil(u64::from(world)) * u64::from(world));
                    prop_assert!(total - n < u64::from(world));
                }
            }
        }

        // Determinism, and a different order for another seed or epoch.
        #[test]
        fn deterministic_and_seed_and_epoch_dependent(
            n in 50u64..2000, block in 1u32..8, seed: u64, epoch in 0u64..1000,
        ) {
            let s = PlanSpec { seed, epoch, ..spec(1, 1, block, PlanTail::Pad) };
            let a = epoch_order(n, &s);
            prop_assert_eq!(&a, &epoch_order(n, &s));
            prop_assert_ne!(&a, &epoch_order(n, &PlanSpec { seed: seed ^ 1, ..s }));
            prop_assert_ne!(&a, &epoch_order(n, &PlanSpec { epoch: epoch + 1, ..s }));
        }

        // Block shuffling keeps each block's objects together: the
        // positions holding one block's members form one contiguous run.
        #[test]
        fn blocks_stay_contiguous(n in 1u64..500, block in 1u32..32, seed: u64) {
            let s = PlanSpec { seed, ..spec(1, 1, block, PlanTail::Pad) };
            let order = epoch_order(n, &s);
            let mut runs: BTreeMap<u64, (usize, usize, usize)> = BTreeMap::new();
            for (position, object) in order.iter().enumerate() {
                let run = runs.entry(object / u64::from(block)).or_insert((position, position, 0));
                run.1 = position;
                run.2 += 1;
            }
            for (b, (first, last, members)) in runs {
                prop_assert_eq!(last - first + 1, members, "block {} is split", b);
            }
        }

        // Exact resume: consumed samples plus the resumed plan equal the
        // original plan's samples, also with a different worker count and
        // across two resumes.
        #[test]
        fn resume_is_exact_even_with_a_new_worker_count(
            n in 1u64..400, world in 1u32..4, rank_pick in 0u32..4,
            workers_a in 1u32..5, workers_b in 1u32..5, workers_c in 1u32..5,
            fractions in proptest::collection::vec(0.0f64..=1.0, 8),
            tail in tail_strategy(),
        ) {
            let rank = rank_pick % world;
            let base = PlanSpec { rank, ..spec(world, workers_a, 4, tail) };
            let full = rank_sequence(n, &base).unwrap();
            let mut consumed = Vec::new();
            let mut state = PlanState::start(base.epoch, workers_a);
            for (phase, workers) in [workers_a, workers_b, workers_c].into_iter().enumerate() {
                if phase > 0 {
                    state = state.resume_with(workers);
                }
                let resume = if phase == 0 { None } else { Some(&state) };
                let mut positions = Vec::new();
                for worker in 0..workers {
                    let s = PlanSpec { worker, num_workers: workers, ..base };
                    let seq = worker_sequence(n, &s, resume).unwrap();
                    let f = fractions[(phase * 3 + worker as usize) % fractions.len()];
                    let take = ((seq.len() as f64) * f) as usize;
                    consumed.extend_from_slice(&seq[..take]);
                    positions.push(take as u64);
                }
                state.positions = positions;
                let json = serde_json::to_string(&state).unwrap();
                state = serde_json::from_str(&json).unwrap();
            }
            let final_workers = state.num_workers;
            let resumed = state.clone().resume_with(final_workers);
            for worker in 0..final_workers {
                let s = PlanSpec { worker, num_workers: final_workers, ..base };
                consumed.extend(worker_sequence(n, &s, Some(&resumed)).unwrap());
            }
            let mut want = full.clone();
            want.sort_unstable();
            consumed.sort_unstable();
            prop_assert_eq!(consumed, want);
        }
    }
}
