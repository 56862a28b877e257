//! Erasure coding: how an `ec:K+M` dataset lays its bytes over the devices,
//! and the Reed-Solomon codec that encodes and rebuilds its stripes.
//!
//! **Space.** An erasure-coded dataset owns whole *rows* of the pool (a row
//! is one stripe unit on every device, `device_count × stripe_unit` logical
//! bytes, row aligned). Its rows, taken in the order the ingest allocated
//! them, form a sequence of units; unit `p` of that sequence lies on device
//! `p % device_count`. Stripe `s` is units `s·W .. s·W + W` (`W = K + M`);
//! stripe position `i` (0..K data, K..W parity) is unit `s·W + (i + s) % W`.
//! Because `W ≤ device_count`, the W units of a stripe are always on W
//! different devices, and the rotation by `s` moves parity from device to
//! device, so parity reads and writes spread over the pool like data does
//! (also when the stripe is as wide as the pool).
//!
//! **Data space.** Objects are placed in the dataset's *data space*, the
//! concatenation of the data units of its stripes: data byte `d` is in data
//! unit `d / U`, which is unit `(d / U) % K` of stripe `(d / U) / K`. An
//! object record's `logical_offset` is a data-space offset for these
//! datasets, so everything above the layout (checksum blocks, windows,
//! scheduling) is the same as for `stripe` datasets.
//!
//! **Unit checksums.** Every unit, data and parity, has a CRC-32 that also
//! covers the dataset id, the stripe index and the unit's position in it.
//! A unit written to the wrong place (misdirected), left half-written (torn)
//! or holding another dataset's stale bytes fails its check even when its
//! bytes are a valid unit of something else. Rebuilt units are checked
//! against the same CRC before they are served or written back.

use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::alloc::Extent;
use crate::layout::{Segment, StripeLayout};

/// Most data units per stripe.
pub const DATA_UNITS_MAX: u8 = 16;
/// Most parity units per stripe.
pub const PARITY_UNITS_MAX: u8 = 4;

/// K data and M parity units per stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EcGeometry {
    pub data_units: u8,
    pub parity_units: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EcError {
    #[error(
        "erasure coding ec:{k}+{m} is not supported: need 1 ≤ K ≤ {DATA_UNITS_MAX} and 1 ≤ M ≤ {PARITY_UNITS_MAX}"
    )]
    Geometry { k: u32, m: u32 },
    #[error(
        "ec:{k}+{m} needs {} devices (one per unit of a stripe) but the pool has {devices}",
        k + m
    )]
    TooWide { k: u32, m: u32, devices: u32 },
    #[error("stripe {stripe}: {lost} units lost, more than the {m} parity units can rebuild")]
    Unrecoverable { stripe: u64, lost: usize, m: u8 },
}

impl EcGeometry {
    pub fn new(k: u32, m: u32) -> Result<Self, EcError> {
        if !(1..=u32::from(DATA_UNITS_MAX)).contains(&k)
            || !(1..=u32::from(PARITY_UNITS_MAX)).contains(&m)
        {
            return Err(EcError::Geometry { k, m });
        }
        Ok(Self {
            data_units: k as u8,
            parity_units: m as u8,
        })
    }

    /// Checks that a pool of `devices` can hold every unit of a stripe on
    /// its own device.
    pub fn check_fits(self, devices: u32) -> Result<(), EcError> {
        if self.width() > devices {
            return Err(EcError::TooWide {
                k: self.k() as u32,
                m: self.m() as u32,
                devices,
            });
        }
        Ok(())
    }

    pub fn k(self) -> usize {
        usize::from(self.data_units)
    }

    pub fn m(self) -> usize {
        usize::from(self.parity_units)
    }

    /// Units per stripe.
    pub fn width(self) -> u32 {
        u32::from(self.data_units) + u32::from(self.parity_units)
    }
}

/// CRC-32 of one stripe unit, bound to where it belongs.
/// Bytes per checked row of a unit in datasets written by format 2: each
/// row of each unit has its own CRC, so rot is rebuilt row by row from
/// the same rows of the other units, whichever units rot elsewhere.
pub const UNIT_ROW_BYTES: u64 = crate::device::CHECKSUM_BLOCK_BYTES as u64;

/// CRC-32 of row `row` of unit `position` of `stripe`: the ids and the
/// row number are hashed with the bytes, so a row written to the wrong
/// place (or left from another dataset) fails its check.
pub fn row_crc(dataset_id: u64, stripe: u64, position: u32, row: u32, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&dataset_id.to_le_bytes());
    h.update(&stripe.to_le_bytes());
    h.update(&position.to_le_bytes());
    h.update(&row.to_le_bytes());
    h.update(bytes);
    h.finalize()
}

/// A unit's check values: one per row (`rows` of them, `rows > 1`), or
/// one over the whole unit (`rows == 1`: datasets written before rows
/// had CRCs, where [`unit_crc`] is the check).
pub fn unit_checks(
    dataset_id: u64,
    stripe: u64,
    position: u32,
    bytes: &[u8],
    rows: usize,
) -> Vec<u32> {
    if rows <= 1 {
        return vec![unit_crc(dataset_id, stripe, position, bytes)];
    }
    let row_bytes = bytes.len() / rows;
    bytes
        .chunks(row_bytes)
        .enumerate()
        .map(|(r, b)| row_crc(dataset_id, stripe, position, r as u32, b))
        .collect()
}

pub fn unit_crc(dataset_id: u64, stripe: u64, position: u32, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&dataset_id.to_le_bytes());
    h.update(&stripe.to_le_bytes());
    h.update(&position.to_le_bytes());
    h.update(bytes);
    h.finalize()
}

/// Where the units of one erasure-coded dataset live; see the module docs.
#[derive(Debug, Clone)]
pub struct EcMap {
    pub geometry: EcGeometry,
    pool: StripeLayout,
    /// Row-aligned extents of whole rows, in data order.
    extents: Vec<Extent>,
    /// Sequence index of each extent's first unit.
    unit_starts: Vec<u64>,
    units_total: u64,
}

impl EcMap {
    /// `extents` must be row aligned and whole rows; they are used in the
    /// order given.
    pub fn new(geometry: EcGeometry, pool: StripeLayout, extents: &[Extent]) -> Self {
        let row_bytes = pool.stripe_unit_bytes * u64::from(pool.device_count);
        let mut unit_starts = Vec::with_capacity(extents.len());
        let mut units_total = 0;
        for e in extents {
            debug_assert_eq!(e.offset % row_bytes, 0, "extent {e:?} is not row aligned");
            debug_assert_eq!(e.len % row_bytes, 0, "extent {e:?} is not whole rows");
            unit_starts.push(units_total);
            units_total += e.len / pool.stripe_unit_bytes;
        }
        Self {
            geometry,
            pool,
            extents: extents.to_vec(),
            unit_starts,
            units_total,
        }
    }

    pub fn unit_bytes(&self) -> u64 {
        self.pool.stripe_unit_bytes
    }

    /// Whole stripes the rows hold.
    pub fn stripes(&self) -> u64 {
        self.units_total / u64::from(self.geometry.width())
    }

    /// Data bytes the rows hold.
    pub fn data_capacity_bytes(&self) -> u64 {
        self.stripes() * self.geometry.k() as u64 * self.unit_bytes()
    }

    /// Data bytes in one stripe.
    pub fn stripe_data_bytes(&self) -> u64 {
        self.geometry.k() as u64 * self.unit_bytes()
    }

    /// Device and device offset of unit `position` of stripe `stripe`.
    pub fn unit_location(&self, stripe: u64, position: u32) -> (u32, u64) {
        let w = u64::from(self.geometry.width());
        // Rotate positions by stripe so parity moves from device to device
        // even when the stripe is as wide as the pool.
        let slot = (u64::from(position) + stripe % w) % w;
        let p = stripe * w + slot;
        debug_assert!(p < self.units_total, "unit {p} is past the dataset's rows");
        let e = self.unit_starts.partition_point(|&s| s <= p) - 1;
        let logical = self.extents[e].offset + (p - self.unit_starts[e]) * self.unit_bytes();
        self.pool.map(logical)
    }

    /// Stripe and position of the data unit holding data byte `data`.
    pub fn data_unit_of(&self, data: u64) -> (u64, u32) {
        let du = data / self.unit_bytes();
        let k = self.geometry.k() as u64;
        (du / k, (du % k) as u32)
    }

    /// Splits data-space `[data, data + len)` at unit boundaries into device
    /// pieces. `Segment::logical` is the data-space offset.
    pub fn segments(&self, data: u64, len: u64) -> impl Iterator<Item = Segment> + '_ {
        let end = data + len;
        let unit = self.unit_bytes();
        let mut at = data;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let seg_end = ((at / unit + 1) * unit).min(end);
            let (stripe, position) = self.data_unit_of(at);
            let (device, unit_offset) = self.unit_location(stripe, position);
            let s = Segment {
                logical: at,
                device,
                device_offset: unit_offset + at % unit,
                len: seg_end - at,
            };
            at = seg_end;
            Some(s)
        })
    }
}

/// Reed-Solomon over GF(2^8) for one geometry (reed-solomon-erasure with
/// SIMD; chosen by the comparison in BENCHMARKS.md).
pub struct Codec {
    rs: ReedSolomon,
    geometry: EcGeometry,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("geometry", &self.geometry)
            .finish()
    }
}

impl Codec {
    pub fn new(geometry: EcGeometry) -> Self {
        let rs = ReedSolomon::new(geometry.k(), geometry.m())
            .expect("EcGeometry bounds are within what reed-solomon-erasure supports");
        Self { rs, geometry }
    }

    /// Computes the parity units from the data units (all the same length).
    pub fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) {
        assert_eq!(data.len(), self.geometry.k());
        assert_eq!(parity.len(), self.geometry.m());
        self.rs
            .encode_sep(data, parity)
            .expect("shard counts and lengths are checked by the caller");
    }

    /// Rebuilds the units whose flag is false from the others, in place.
    /// `units` holds all `K + M` units of a stripe, in position order.
    pub fn reconstruct(&self, stripe: u64, units: &mut [(&mut [u8], bool)]) -> Result<(), EcError> {
        assert_eq!(units.len(), self.geometry.width() as usize);
        let lost = units.iter().filter(|u| !u.1).count();
        if lost > self.geometry.m() {
            return Err(EcError::Unrecoverable {
                stripe,
                lost,
                m: self.geometry.parity_units,
            });
        }
        if lost == 0 {
            return Ok(());
        }
        self.rs
            .reconstruct(units)
            .map_err(|_| EcError::Unrecoverable {
                stripe,
                lost,
                m: self.geometry.parity_units,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn pool(n: u32, unit: u64, rows: u64) -> StripeLayout {
        StripeLayout {
            device_count: n,
            stripe_unit_bytes: unit,
            data_offset_bytes: 1 << 20,
            device_data_bytes: rows * unit,
        }
    }

    #[test]
    fn geometry_bounds() {
        assert!(EcGeometry::new(4, 1).is_ok());
        assert_eq!(EcGeometry::new(0, 1), Err(EcError::Geometry { k: 0, m: 1 }));
        assert_eq!(EcGeometry::new(3, 0), Err(EcError::Geometry { k: 3, m: 0 }));
        assert!(EcGeometry::new(17, 1).is_err());
        let g = EcGeometry::new(4, 1).unwrap();
        assert_eq!(
            g.check_fits(4),
            Err(EcError::TooWide {
                k: 4,
                m: 1,
                devices: 4
            })
        );
        assert!(g.check_fits(5).is_ok());
    }

    #[test]
    fn unit_crc_binds_position() {
        let b = vec![7u8; 4096];
        let c = unit_crc(1, 2, 3, &b);
        assert_ne!(c, unit_crc(2, 2, 3, &b));
        assert_ne!(c, unit_crc(1, 3, 3, &b));
        assert_ne!(c, unit_crc(1, 2, 0, &b));
        assert_eq!(c, unit_crc(1, 2, 3, &b));
    }

    /// A random pool, geometry and set of row extents (in a shuffled order).
    fn model() -> impl Strategy<Value = (StripeLayout, EcGeometry, Vec<Extent>)> {
        (2u32..=8, 1u64..=4, 4u64..=24)
            .prop_flat_map(|(n, unit_blocks, rows)| {
                let k_max = (n - 1).min(u32::from(DATA_UNITS_MAX));
                (
                    Just((n, unit_blocks, rows)),
                    1u32..=k_max,
                    1u32..=u32::from(PARITY_UNITS_MAX),
                    proptest::collection::vec(any::<bool>(), rows as usize),
                    any::<u64>(),
                )
            })
            .prop_filter_map(
                "stripe wider than pool",
                |((n, ub, rows), k, m, take, seed)| {
                    let g = EcGeometry::new(k, m).ok()?;
                    g.check_fits(n).ok()?;
                    let layout = pool(n, ub * 4096, rows);
                    let row_bytes = layout.stripe_unit_bytes * u64::from(n);
                    // Some rows, as extents of runs, in a seed-shuffled order.
                    let mut extents = Vec::new();
                    let mut r = 0u64;
                    while r < rows {
                        if take[r as usize] {
                            let mut len = 1;
                            while r + len < rows && take[(r + len) as usize] && len < 3 {
                                len += 1;
                            }
                            extents.push(Extent {
                                offset: r * row_bytes,
                                len: len * row_bytes,
                            });
                            r += len;
                        } else {
                            r += 1;
                        }
                    }
                    if extents.is_empty() {
                        return None;
                    }
                    let rot = (seed % extents.len() as u64) as usize;
                    extents.rotate_left(rot);
                    Some((layout, g, extents))
                },
            )
    }

    proptest! {
        /// Every unit of every stripe is on a distinct device, inside the
        /// dataset's rows, and no device byte is used twice; parity is not
        /// stuck on one device.
        #[test]
        fn stripes_use_distinct_devices_and_owned_space((layout, g, extents) in model()) {
            let map = EcMap::new(g, layout, &extents);
            let mut seen = HashSet::new();
            for s in 0..map.stripes() {
                let mut devices = HashSet::new();
                for p in 0..g.width() {
                    let (d, off) = map.unit_location(s, p);
                    prop_assert!(devices.insert(d), "stripe {s} puts two units on device {d}");
                    prop_assert!(seen.insert((d, off)), "unit placed twice");
                    let logical = layout.unmap(d, off).expect("inside the data area");
                    prop_assert!(extents.iter().any(|e| logical >= e.offset && logical < e.end()));
                    prop_assert_eq!(off % layout.stripe_unit_bytes, layout.data_offset_bytes % layout.stripe_unit_bytes);
                }
            }
            if map.stripes() >= u64::from(g.width()) {
                let parity: HashSet<u32> = (0..g.width() as u64)
                    .map(|s| map.unit_location(s, g.width() - 1).0)
                    .collect();
                prop_assert!(parity.len() > 1, "parity always on one device");
            }
            // Whole rows give whole units; at most W-1 of them are spare.
            let units: u64 = extents.iter().map(|e| e.len / layout.stripe_unit_bytes).sum();
            prop_assert!(units - map.stripes() * u64::from(g.width()) < u64::from(g.width()));
        }

        /// Data-space segments tile the range, each within one data unit,
        /// and agree with the unit mapping.
        #[test]
        fn segments_tile_data_space((layout, g, extents) in model(), a in any::<u64>(), b in any::<u64>()) {
            let map = EcMap::new(g, layout, &extents);
            let cap = map.data_capacity_bytes();
            prop_assume!(cap > 0);
            let (x, y) = (a % cap, b % cap);
            let (start, end) = (x.min(y), x.max(y));
            let mut at = start;
            for s in map.segments(start, end - start) {
                prop_assert_eq!(s.logical, at);
                prop_assert!(s.len > 0 && s.len <= layout.stripe_unit_bytes);
                let (stripe, pos) = map.data_unit_of(s.logical);
                prop_assert!((pos as usize) < g.k());
                let (d, off) = map.unit_location(stripe, pos);
                prop_assert_eq!(s.device, d);
                prop_assert_eq!(s.device_offset, off + s.logical % layout.stripe_unit_bytes);
                at += s.len;
            }
            prop_assert_eq!(at, end);
        }

        /// Reference model of reconstruction: encode random units, lose a
        /// random set; up to M lost units come back bit-exact, more are
        /// reported unrecoverable.
        #[test]
        fn reconstruct_any_m_lost(
            k in 1u32..=8, m in 1u32..=4, len_words in 1usize..64,
            seed in any::<u64>(), lost_mask in any::<u32>(),
        ) {
            let g = EcGeometry::new(k, m).unwrap();
            let codec = Codec::new(g);
            let w = g.width() as usize;
            let len = len_words * 64;
            let mut x = seed | 1;
            let mut rnd = move || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 };
            let data: Vec<Vec<u8>> = (0..g.k()).map(|_| (0..len).map(|_| rnd()).collect()).collect();
            let mut parity = vec![vec![0u8; len]; g.m()];
            {
                let d: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
                let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| v.as_mut_slice()).collect();
                codec.encode(&d, &mut p);
            }
            let original: Vec<Vec<u8>> = data.iter().chain(parity.iter()).cloned().collect();
            let lost: Vec<bool> = (0..w).map(|i| lost_mask & (1 << i) != 0).collect();
            let n_lost = lost.iter().filter(|l| **l).count();
            let mut units: Vec<Vec<u8>> = original
                .iter()
                .zip(&lost)
                .map(|(u, l)| if *l { vec![0xEE; len] } else { u.clone() })
                .collect();
            let mut shards: Vec<(&mut [u8], bool)> =
                units.iter_mut().zip(&lost).map(|(u, l)| (u.as_mut_slice(), !*l)).collect();
            let r = codec.reconstruct(9, &mut shards);
            if n_lost <= g.m() {
                prop_assert!(r.is_ok());
                prop_assert_eq!(&units, &original);
            } else {
                prop_assert_eq!(r, Err(EcError::Unrecoverable { stripe: 9, lost: n_lost, m: g.parity_units }));
            }
        }
    }
}
