//! (device, offset) scheduling of a set of device reads, merging adjacent
//! ones.
//!
//! Work that is known together (the items of one `ReadInto` group, the
//! objects of a read-ahead hint) is first cut into per-device pieces
//! ([`Want`]s). They are sorted by (device, offset), and a piece that starts
//! where the previous one on the same device ends joins it into one device
//! read ([`Run`]), up to `merge_bytes_max`. With block-shuffled training
//! plans the samples of a batch are neighbours on disk, so a batch of small
//! objects becomes a few large reads instead of one read per sample.
//!
//! When each piece has its own destination (a client region), pieces merge
//! only if their destinations are contiguous too, so a run is still one
//! plain read into one place. Runs are then issued round-robin across
//! devices, each device's in offset order: every device gets work at once,
//! and each sees its reads as one ascending sweep.

use std::ops::Range;

/// One piece of a read, on one device. `dest` is where its bytes go (a
/// region offset) when destinations matter; `tag` says whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub device: u32,
    pub device_offset: u64,
    pub len: u64,
    pub dest: u64,
    pub tag: usize,
}

/// One device read covering `wants[wants]` (indices into the sorted
/// slice), which lie back to back from `device_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub device: u32,
    pub device_offset: u64,
    pub len: u64,
    pub dest: u64,
    pub wants: Range<usize>,
}

/// Sorts `wants` by (device, offset) and merges neighbours into runs of at
/// most `merge_bytes_max` (a single larger want stays one run; 0 disables
/// merging). With `dest_contiguous`, neighbours merge only if their `dest`s
/// are contiguous as well. Runs come back in issue order: round-robin over
/// devices, ascending offsets within each device.
pub fn schedule(wants: &mut [Want], merge_bytes_max: u64, dest_contiguous: bool) -> Vec<Run> {
    wants.sort_by_key(|w| (w.device, w.device_offset, w.tag));
    let mut per_device: Vec<Vec<Run>> = Vec::new();
    for (i, w) in wants.iter().enumerate() {
        let joins = per_device
            .last_mut()
            .and_then(|runs| runs.last_mut())
            .filter(|r| {
                r.device == w.device
                    && r.device_offset + r.len == w.device_offset
                    && (!dest_contiguous || r.dest + r.len == w.dest)
                    && r.len + w.len <= merge_bytes_max
            });
        match joins {
            Some(run) => {
                run.len += w.len;
                run.wants.end = i + 1;
            }
            None => {
                let run = Run {
                    device: w.device,
                    device_offset: w.device_offset,
                    len: w.len,
                    dest: w.dest,
                    wants: i..i + 1,
                };
                match per_device.last_mut() {
                    Some(runs) if runs[0].device == w.device => runs.push(run),
                    _ => per_device.push(vec![run]),
                }
            }
        }
    }
    // Interleave: first run of each device, then the second of each, ...
    let total = per_device.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total);
    let mut iters: Vec<_> = per_device.into_iter().map(Vec::into_iter).collect();
    while out.len() < total {
        for it in &mut iters {
            out.extend(it.next());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn want(device: u32, device_offset: u64, len: u64, dest: u64, tag: usize) -> Want {
        Want {
            device,
            device_offset,
            len,
            dest,
            tag,
        }
    }

    #[test]
    fn neighbours_merge_and_devices_interleave() {
        let mut w = vec![
            want(1, 8192, 4096, 0, 0),
            want(0, 4096, 4096, 0, 1),
            want(1, 4096, 4096, 0, 2),
            want(0, 0, 4096, 0, 3),
            want(0, 65536, 4096, 0, 4),
        ];
        let runs = schedule(&mut w, 1 << 20, false);
        let got: Vec<(u32, u64, u64)> = runs
            .iter()
            .map(|r| (r.device, r.device_offset, r.len))
            .collect();
        assert_eq!(
            got,
            vec![(0, 0, 8192), (1, 4096, 8192), (0, 65536, 4096)],
            "device 0's first run, device 1's, then device 0's second"
        );
    }

    #[test]
    fn destinations_must_be_contiguous_when_they_matter() {
        let mut w = vec![want(0, 0, 4096, 0, 0), want(0, 4096, 4096, 12288, 1)];
        assert_eq!(schedule(&mut w, 1 << 20, true).len(), 2);
        assert_eq!(schedule(&mut w, 1 << 20, false).len(), 1);
        let mut w = vec![want(0, 0, 4096, 0, 0), want(0, 4096, 4096, 4096, 1)];
        assert_eq!(schedule(&mut w, 1 << 20, true).len(), 1);
        // Merging off.
        assert_eq!(schedule(&mut w, 0, true).len(), 2);
    }

    fn arb_wants() -> impl Strategy<Value = Vec<Want>> {
        // Non-overlapping 4 KiB-granular pieces on up to 4 devices, each
        // with a destination that is contiguous with its device neighbour
        // about half the time.
        prop::collection::vec((0u32..4, 0u64..64, 1u64..8, any::<bool>()), 0..60).prop_map(|raw| {
            let mut taken = std::collections::HashSet::new();
            let mut out = Vec::new();
            for (tag, (device, slot, blocks, contiguous)) in raw.into_iter().enumerate() {
                // Slots of 8 blocks so pieces never overlap.
                if !taken.insert((device, slot)) {
                    continue;
                }
                let off = slot * 8 * 4096;
                let dest = if contiguous { off } else { off + (1 << 30) };
                out.push(want(device, off, blocks * 4096, dest, tag));
            }
            out
        })
    }

    proptest! {
        // Runs cover every want exactly once, each run is one contiguous
        // device range (and destination range when asked), no merged run
        // exceeds the cap, and each device's runs ascend.
        #[test]
        fn runs_partition_the_wants(
            mut wants in arb_wants(),
            cap_blocks in 0u64..40,
            dest_contiguous in any::<bool>(),
        ) {
            let cap = cap_blocks * 4096;
            let before = wants.len();
            let runs = schedule(&mut wants, cap, dest_contiguous);
            prop_assert_eq!(wants.len(), before);
            let mut covered = vec![0u32; wants.len()];
            let mut last_per_device = std::collections::HashMap::new();
            for r in &runs {
                prop_assert!(!r.wants.is_empty());
                let mut at = r.device_offset;
                let mut dest = r.dest;
                for w in &wants[r.wants.clone()] {
                    prop_assert_eq!(w.device, r.device);
                    prop_assert_eq!(w.device_offset, at);
                    if dest_contiguous {
                        prop_assert_eq!(w.dest, dest);
                    }
                    at += w.len;
                    dest += w.len;
                }
                for c in &mut covered[r.wants.clone()] {
                    *c += 1;
                }
                prop_assert_eq!(at - r.device_offset, r.len);
                prop_assert!(r.wants.len() == 1 || r.len <= cap);
                if let Some(prev) = last_per_device.insert(r.device, r.device_offset) {
                    prop_assert!(prev < r.device_offset, "device {} runs ascend", r.device);
                }
            }
            prop_assert!(covered.iter().all(|&c| c == 1));
        }
    }
}
