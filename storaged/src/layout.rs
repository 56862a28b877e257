//! RAID-0 striping: the pool's logical address space mapped onto devices.
//!
//! Logical bytes are cut into stripe units of `stripe_unit_bytes`; unit `u`
//! lives on device `u % device_count`, in row `u / device_count`, at device
//! offset `data_offset_bytes + row * stripe_unit_bytes`. A large object is one
//! contiguous logical extent, so reading it sequentially touches every device
//! in turn and a read-ahead of `device_count` units keeps all of them busy.
//! The mapping is a pure function, which is what the proptest model checks:
//! distinct logical bytes land on distinct device bytes, and every device
//! byte of the data area has exactly one logical preimage.

/// Geometry of a striped pool. All sizes are multiples of 4 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripeLayout {
    pub device_count: u32,
    pub stripe_unit_bytes: u64,
    /// Where the data area starts on each device (after the superblock).
    pub data_offset_bytes: u64,
    /// Usable data bytes per device; a multiple of the stripe unit.
    pub device_data_bytes: u64,
}

/// A piece of a logical range that lies on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub logical: u64,
    pub device: u32,
    pub device_offset: u64,
    pub len: u64,
}

impl StripeLayout {
    /// Usable bytes of the whole pool.
    pub fn capacity_bytes(&self) -> u64 {
        self.device_data_bytes * u64::from(self.device_count)
    }

    /// Device and device offset of logical byte `logical`.
    pub fn map(&self, logical: u64) -> (u32, u64) {
        debug_assert!(logical < self.capacity_bytes());
        let unit = logical / self.stripe_unit_bytes;
        let within = logical % self.stripe_unit_bytes;
        let device = (unit % u64::from(self.device_count)) as u32;
        let row = unit / u64::from(self.device_count);
        (
            device,
            self.data_offset_bytes + row * self.stripe_unit_bytes + within,
        )
    }

    /// Inverse of [`map`](Self::map) for a byte of the data area.
    pub fn unmap(&self, device: u32, device_offset: u64) -> Option<u64> {
        if device >= self.device_count
            || device_offset < self.data_offset_bytes
            || device_offset >= self.data_offset_bytes + self.device_data_bytes
        {
            return None;
        }
        let rel = device_offset - self.data_offset_bytes;
        let row = rel / self.stripe_unit_bytes;
        let within = rel % self.stripe_unit_bytes;
        let unit = row * u64::from(self.device_count) + u64::from(device);
        Some(unit * self.stripe_unit_bytes + within)
    }

    /// Splits `[logical, logical + len)` at stripe-unit boundaries.
    pub fn segments(&self, logical: u64, len: u64) -> impl Iterator<Item = Segment> + '_ {
        let end = logical + len;
        let mut at = logical;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let unit_end = (at / self.stripe_unit_bytes + 1) * self.stripe_unit_bytes;
            let seg_end = unit_end.min(end);
            let (device, device_offset) = self.map(at);
            let s = Segment {
                logical: at,
                device,
                device_offset,
                len: seg_end - at,
            };
            at = seg_end;
            Some(s)
        })
    }

    /// Bytes of `[logical, logical + len)` that land on each device.
    pub fn bytes_per_device(&self, logical: u64, len: u64, out: &mut [u64]) {
        let n = u64::from(self.device_count);
        let row_bytes = self.stripe_unit_bytes * n;
        let end = logical + len;
        // Head up to a row boundary, whole rows in closed form, then the tail.
        let head_end = logical.next_multiple_of(row_bytes).min(end);
        for s in self.segments(logical, head_end - logical) {
            out[s.device as usize] += s.len;
        }
        let rows = (end - head_end) / row_bytes;
        for o in out.iter_mut() {
            *o += rows * self.stripe_unit_bytes;
        }
        let tail_start = head_end + rows * row_bytes;
        for s in self.segments(tail_start, end - tail_start) {
            out[s.device as usize] += s.len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geometry() -> impl Strategy<Value = StripeLayout> {
        (1u32..=8, 1u64..=16, 1u64..=8, 1u64..=32).prop_map(|(n, unit_blocks, off_blocks, rows)| {
            let unit = unit_blocks * 4096;
            StripeLayout {
                device_count: n,
                stripe_unit_bytes: unit,
                data_offset_bytes: off_blocks * 4096,
                device_data_bytes: rows * unit,
            }
        })
    }

    proptest! {
        // The mapping is a bijection between logical bytes and the data
        // area: map then unmap is the identity, and no two logical bytes
        // share a device byte.
        #[test]
        fn map_is_a_bijection(l in geometry(), picks in proptest::collection::vec(any::<u64>(), 1..64)) {
            let cap = l.capacity_bytes();
            let mut seen = std::collections::HashMap::new();
            for p in picks {
                let logical = p % cap;
                let (d, off) = l.map(logical);
                prop_assert!(d < l.device_count);
                prop_assert!(off >= l.data_offset_bytes && off < l.data_offset_bytes + l.device_data_bytes);
                prop_assert_eq!(l.unmap(d, off), Some(logical));
                if let Some(prev) = seen.insert((d, off), logical) {
                    prop_assert_eq!(prev, logical);
                }
            }
        }

        // Every device byte of the data area maps back to a logical byte
        // that maps to it (surjectivity).
        #[test]
        fn unmap_covers_data_area(l in geometry(), d in 0u32..8, p in any::<u64>()) {
            let d = d % l.device_count;
            let off = l.data_offset_bytes + p % l.device_data_bytes;
            let logical = l.unmap(d, off).unwrap();
            prop_assert!(logical < l.capacity_bytes());
            prop_assert_eq!(l.map(logical), (d, off));
        }

        // Segments of a range cover it exactly, in order, each within one
        // stripe unit and contiguous on its device; a read through them of a
        // range crossing stripe boundaries returns exactly the logical bytes.
        #[test]
        fn segments_tile_ranges(l in geometry(), a in any::<u64>(), b in any::<u64>()) {
            let cap = l.capacity_bytes();
            let start = a % cap;
            let len = b % (cap - start + 1);
            // A byte-addressed model of the devices holding the logical
            // address of each byte.
            let mut at = start;
            let mut per_dev = vec![0u64; l.device_count as usize];
            for s in l.segments(start, len) {
                prop_assert_eq!(s.logical, at);
                prop_assert!(s.len > 0 && s.len <= l.stripe_unit_bytes);
                prop_assert_eq!(s.logical / l.stripe_unit_bytes, (s.logical + s.len - 1) / l.stripe_unit_bytes);
                for k in [0, s.len / 2, s.len - 1] {
                    prop_assert_eq!(l.map(s.logical + k), (s.device, s.device_offset + k));
                }
                per_dev[s.device as usize] += s.len;
                at += s.len;
            }
            prop_assert_eq!(at, start + len);
            let mut closed = vec![0u64; l.device_count as usize];
            l.bytes_per_device(start, len, &mut closed);
            prop_assert_eq!(per_dev, closed);
        }
    }

    #[test]
    fn four_devices_one_mib() {
        let l = StripeLayout {
            device_count: 4,
            stripe_unit_bytes: 1 << 20,
            data_offset_bytes: 1 << 20,
            device_data_bytes: 16 << 20,
        };
        assert_eq!(l.map(0), (0, 1 << 20));
        assert_eq!(l.map((1 << 20) + 5), (1, (1 << 20) + 5));
        assert_eq!(l.map(4 << 20), (0, 2 << 20));
        let segs: Vec<_> = l.segments((1 << 20) - 4096, 8192).collect();
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[0].device, segs[1].device), (0, 1));
    }
}
