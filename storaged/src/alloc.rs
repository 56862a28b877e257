//! Free-space map of the pool's logical address space.
//!
//! Free space is a set of disjoint extents (start → length, 4 KiB granular)
//! held only in memory. It is never persisted on its own: at start it is
//! rebuilt as the complement of the extents recorded by committed datasets
//! in the catalog. That is what makes allocation crash-safe by construction:
//! space taken by an ingest that never committed is free again after a
//! restart, because nothing durable claims it.

use std::collections::BTreeMap;

/// Allocation granularity: objects start on O_DIRECT (4 KiB) boundaries.
pub const BLOCK_BYTES: u64 = crate::buf::ALIGN_BYTES as u64;

/// A logical byte range `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("extent {0:?} is outside the pool ({1} bytes) or not 4 KiB aligned")]
    OutOfBounds(Extent, u64),
    #[error("extent {0:?} overlaps space already in use")]
    Overlap(Extent),
}

/// First-fit extent allocator; see the module docs.
#[derive(Debug)]
pub struct ExtentAllocator {
    capacity_bytes: u64,
    free: BTreeMap<u64, u64>,
    free_bytes: u64,
}

impl ExtentAllocator {
    /// An allocator with `used` extents already taken.
    pub fn new(capacity_bytes: u64, used: &[Extent]) -> Result<Self, AllocError> {
        let capacity_bytes = capacity_bytes - capacity_bytes % BLOCK_BYTES;
        let mut a = Self {
            capacity_bytes,
            free: BTreeMap::new(),
            free_bytes: 0,
        };
        if capacity_bytes > 0 {
            a.free.insert(0, capacity_bytes);
            a.free_bytes = capacity_bytes;
        }
        for e in used {
            a.mark_used(*e)?;
        }
        Ok(a)
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    pub fn used_bytes(&self) -> u64 {
        self.capacity_bytes - self.free_bytes
    }

    pub fn free_extent_count(&self) -> usize {
        self.free.len()
    }

    pub fn largest_free_bytes(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    fn check(&self, e: Extent) -> Result<(), AllocError> {
        if !e.offset.is_multiple_of(BLOCK_BYTES)
            || !e.len.is_multiple_of(BLOCK_BYTES)
            || e.end() > self.capacity_bytes
        {
            return Err(AllocError::OutOfBounds(e, self.capacity_bytes));
        }
        Ok(())
    }

    /// Takes `e` out of the free set; it must be wholly free.
    pub fn mark_used(&mut self, e: Extent) -> Result<(), AllocError> {
        self.check(e)?;
        if e.len == 0 {
            return Ok(());
        }
        let (&start, &len) = self
            .free
            .range(..=e.offset)
            .next_back()
            .ok_or(AllocError::Overlap(e))?;
        if start + len < e.end() {
            return Err(AllocError::Overlap(e));
        }
        self.free.remove(&start);
        if e.offset > start {
            self.free.insert(start, e.offset - start);
        }
        if start + len > e.end() {
            self.free.insert(e.end(), start + len - e.end());
        }
        self.free_bytes -= e.len;
        Ok(())
    }

    /// First free extent of at least `len` bytes (rounded up to 4 KiB).
    pub fn allocate(&mut self, len: u64) -> Option<Extent> {
        let len = len.next_multiple_of(BLOCK_BYTES);
        if len == 0 {
            return Some(Extent { offset: 0, len: 0 });
        }
        let (&start, _) = self.free.iter().find(|&(_, &l)| l >= len)?;
        let e = Extent { offset: start, len };
        self.mark_used(e).expect("a free extent can be taken");
        Some(e)
    }

    /// First free run of `len` bytes starting on a multiple of `align`
    /// (both multiples of 4 KiB). Erasure-coded datasets take whole rows
    /// this way.
    pub fn allocate_aligned(&mut self, len: u64, align: u64) -> Option<Extent> {
        debug_assert!(len.is_multiple_of(BLOCK_BYTES) && align.is_multiple_of(BLOCK_BYTES));
        if len == 0 {
            return Some(Extent { offset: 0, len: 0 });
        }
        let start = self.free.iter().find_map(|(&start, &l)| {
            let at = start.next_multiple_of(align);
            (at + len <= start + l).then_some(at)
        })?;
        let e = Extent { offset: start, len };
        self.mark_used(e).expect("a free run can be taken");
        Some(e)
    }

    /// Returns `e` to the free set, merging with its neighbours.
    pub fn release(&mut self, e: Extent) -> Result<(), AllocError> {
        self.check(e)?;
        if e.len == 0 {
            return Ok(());
        }
        let mut start = e.offset;
        let mut end = e.end();
        if let Some((&s, &l)) = self.free.range(..=e.offset).next_back() {
            if s + l > e.offset {
                return Err(AllocError::Overlap(e));
            }
            if s + l == e.offset {
                start = s;
                self.free.remove(&s);
            }
        }
        if let Some((&s, &l)) = self.free.range(e.offset..).next() {
            if s < e.end() {
                // Undo the merge above before failing.
                if start != e.offset {
                    self.free.insert(start, e.offset - start);
                }
                return Err(AllocError::Overlap(e));
            }
            if s == e.end() {
                end = s + l;
                self.free.remove(&s);
            }
        }
        self.free.insert(start, end - start);
        self.free_bytes += e.len;
        Ok(())
    }

    /// Free extents in address order.
    pub fn free_extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.free
            .iter()
            .map(|(&offset, &len)| Extent { offset, len })
    }
}

/// Merges adjacent extents of a sorted-by-offset list in place.
pub fn coalesce(extents: &mut Vec<Extent>) {
    extents.retain(|e| e.len > 0);
    extents.sort();
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents.drain(..) {
        match out.last_mut() {
            Some(last) if last.end() == e.offset => last.len += e.len,
            _ => out.push(e),
        }
    }
    *extents = out;
}

/// Merges extents that follow each other in the list's own order (the
/// order of an erasure-coded dataset's rows is its data order, so it must
/// not be sorted).
pub fn coalesce_in_order(extents: &mut Vec<Extent>) {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents.drain(..).filter(|e| e.len > 0) {
        match out.last_mut() {
            Some(last) if last.end() == e.offset => last.len += e.len,
            _ => out.push(e),
        }
    }
    *extents = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aligned_allocation_and_in_order_coalescing() {
        let mut a = ExtentAllocator::new(64 * BLOCK_BYTES, &[]).unwrap();
        a.allocate(BLOCK_BYTES).unwrap();
        let row = 8 * BLOCK_BYTES;
        let e = a.allocate_aligned(2 * row, row).unwrap();
        assert_eq!(
            e,
            Extent {
                offset: row,
                len: 2 * row
            }
        );
        // The gap before the aligned run stays free.
        assert_eq!(a.free_bytes(), 64 * BLOCK_BYTES - BLOCK_BYTES - 2 * row);
        assert!(a.allocate_aligned(8 * row, row).is_none());
        let mut v = vec![
            Extent {
                offset: row,
                len: row,
            },
            Extent {
                offset: 2 * row,
                len: row,
            },
            Extent {
                offset: 0,
                len: row,
            },
        ];
        coalesce_in_order(&mut v);
        assert_eq!(
            v,
            [
                Extent {
                    offset: row,
                    len: 2 * row
                },
                Extent {
                    offset: 0,
                    len: row
                }
            ]
        );
    }

    #[test]
    fn allocate_release_merge() {
        let mut a = ExtentAllocator::new(64 * BLOCK_BYTES, &[]).unwrap();
        let x = a.allocate(1).unwrap();
        assert_eq!(
            x,
            Extent {
                offset: 0,
                len: 4096
            }
        );
        let y = a.allocate(8192).unwrap();
        assert_eq!(y.offset, 4096);
        assert_eq!(a.free_bytes(), 61 * 4096);
        a.release(x).unwrap();
        assert_eq!(a.release(x), Err(AllocError::Overlap(x)));
        a.release(y).unwrap();
        assert_eq!(a.free_extent_count(), 1);
        assert_eq!(a.free_bytes(), 64 * 4096);
        assert!(a.allocate(65 * 4096).is_none());
    }

    #[test]
    fn rebuild_rejects_overlap() {
        let used = [
            Extent {
                offset: 0,
                len: 8192,
            },
            Extent {
                offset: 4096,
                len: 4096,
            },
        ];
        assert!(ExtentAllocator::new(1 << 20, &used).is_err());
        let bad = [Extent {
            offset: 1 << 20,
            len: 4096,
        }];
        assert!(matches!(
            ExtentAllocator::new(1 << 20, &bad),
            Err(AllocError::OutOfBounds(..))
        ));
    }

    proptest! {
        // Against a per-block reference model: allocations never overlap,
        // free bytes are accounted exactly, and releasing everything restores
        // one free extent.
        #[test]
        fn matches_block_model(ops in proptest::collection::vec((any::<bool>(), 1u64..20, any::<usize>()), 1..200)) {
            const BLOCKS: u64 = 128;
            let mut a = ExtentAllocator::new(BLOCKS * BLOCK_BYTES, &[]).unwrap();
            let mut model = vec![false; BLOCKS as usize];
            let mut live: Vec<Extent> = Vec::new();
            for (alloc, blocks, pick) in ops {
                if alloc || live.is_empty() {
                    if let Some(e) = a.allocate(blocks * BLOCK_BYTES) {
                        for b in e.offset / BLOCK_BYTES..e.end() / BLOCK_BYTES {
                            prop_assert!(!model[b as usize], "double allocation");
                            model[b as usize] = true;
                        }
                        live.push(e);
                    } else {
                        // First fit fails only if no run of free blocks fits.
                        let longest = model.split(|u| *u).map(|r| r.len() as u64).max().unwrap_or(0);
                        prop_assert!(longest < blocks);
                    }
                } else {
                    let e = live.swap_remove(pick % live.len());
                    a.release(e).unwrap();
                    for b in e.offset / BLOCK_BYTES..e.end() / BLOCK_BYTES {
                        model[b as usize] = false;
                    }
                }
                let used = model.iter().filter(|u| **u).count() as u64 * BLOCK_BYTES;
                prop_assert_eq!(a.used_bytes(), used);
            }
            for e in live.drain(..) {
                a.release(e).unwrap();
            }
            prop_assert_eq!(a.free_extent_count(), 1);
        }
    }
}
