//! The pool describes itself: every committed dataset's catalog entries
//! are also on the devices, so losing `catalog.redb` loses nothing.
//!
//! Two structures (byte layouts in docs/FORMAT.md, "Pool metadata on the
//! devices"):
//!
//! - A **manifest** per dataset: its name, its DatasetRecord, every
//!   ObjectRecord with its path, and (`ec`) its unit CRCs, CRC-protected.
//!   It is written, whole, to *every* device: the dataset owns whole rows
//!   for it (`DatasetRecord::manifest`), and each device's share of those
//!   rows (contiguous on that device) holds one full copy. Any single
//!   surviving device can give it back.
//! - A **root** on every device, in one of two slots of the reserved area
//!   between the superblock copies and the data area (slot = generation
//!   mod 2, so the previous root survives a torn write): the generation,
//!   the next dataset id and one entry per committed dataset naming its
//!   manifest (rows, length, CRC).
//!
//! Ordering: a commit makes the dataset's bytes and its manifest copies
//! durable, then writes and syncs the next root on every present device,
//! and only then commits the catalog, which records the root's generation.
//! A delete writes the root without the dataset before the catalog
//! forgets it. The root is therefore never behind the catalog, and at
//! start a catalog that is missing, damaged or behind the root is brought
//! up to the root's state from the manifests ([`Root`] is the truth; the
//! catalog is its index).
//!
//! Device I/O here is synchronous pread/pwrite on the devices' O_DIRECT
//! descriptors with page-aligned buffers: it happens once per commit or
//! delete, off the async workers (callers use `spawn_blocking`).

use std::fs::File;
use std::sync::Arc;

use memmap2::MmapMut;

use crate::alloc::Extent;
use crate::catalog::{CatalogError, DatasetRecord, ObjectRecord};
use crate::device::{DATA_OFFSET_BYTES, SUPERBLOCK_BYTES};
use crate::engine::DeviceFile;
use crate::layout::StripeLayout;

/// Where the two root slots start: after the superblock and its copy.
pub const ROOT_AREA_OFFSET: u64 = 2 * SUPERBLOCK_BYTES as u64;
/// Each slot's size: half of the reserved area, in whole 4 KiB blocks.
pub const ROOT_SLOT_BYTES: u64 =
    ((DATA_OFFSET_BYTES - ROOT_AREA_OFFSET) / 2) & !(crate::buf::ALIGN_BYTES as u64 - 1);
const ROOT_MAGIC: [u8; 8] = *b"SDROOT\0\x01";
const MANIFEST_MAGIC: [u8; 8] = *b"SDMANIF1";
const ALIGN: usize = crate::buf::ALIGN_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum PoolMetaError {
    #[error("device {device}: {source}")]
    Io {
        device: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is damaged: {why}")]
    Corrupt { what: String, why: String },
    #[error(
        "the pool's root holds at most {max} bytes; {needed} are needed ({datasets} datasets): delete datasets or use fewer, larger ones"
    )]
    RootFull {
        needed: usize,
        max: u64,
        datasets: usize,
    },
    #[error("no device holds a readable copy of the manifest of dataset {name:?} (id {id}): {why}")]
    ManifestLost { name: String, id: u64, why: String },
}

fn corrupt(what: &str, why: impl Into<String>) -> PoolMetaError {
    PoolMetaError::Corrupt {
        what: what.to_owned(),
        why: why.into(),
    }
}

/// Where one dataset's manifest is and how to check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootEntry {
    pub name: String,
    pub dataset_id: u64,
    /// Whole rows; each device's share holds a full copy.
    pub manifest_rows: Extent,
    pub manifest_bytes: u64,
    pub manifest_crc: u32,
}

/// The pool's committed state, as the devices know it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Root {
    pub generation: u64,
    pub pool_id: [u8; 16],
    pub next_dataset_id: u64,
    pub entries: Vec<RootEntry>,
    /// Where `device replace` put each replaced device (index, path).
    pub replaced: Vec<(u32, String)>,
    /// The replacement under way, as the catalog's `replace` record.
    pub replacing: Option<Vec<u8>>,
}

/// Little-endian reader that fails (never panics) on short input.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PoolMetaError> {
        if self.b.len() < n {
            return Err(corrupt(self.what, "truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16, PoolMetaError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, PoolMetaError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, PoolMetaError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str16(&mut self) -> Result<String, PoolMetaError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| corrupt(self.what, "a name is not UTF-8"))
    }
}

fn put_str16(v: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    v.extend_from_slice(&(b.len() as u16).to_le_bytes());
    v.extend_from_slice(b);
}

/// Checks the framing shared by roots and manifests: magic, the length
/// at byte 8 (u64), and the CRC-32 in the last 4 bytes. Returns the body
/// between the header (16 bytes) and the CRC.
fn unframe<'a>(b: &'a [u8], magic: &[u8; 8], what: &str) -> Result<&'a [u8], PoolMetaError> {
    if b.len() < 20 || b[..8] != magic[..] {
        return Err(corrupt(what, "no magic"));
    }
    let len = u64::from_le_bytes(b[8..16].try_into().expect("8"));
    if len < 20 || len > b.len() as u64 {
        return Err(corrupt(what, format!("length {len} is out of range")));
    }
    let len = len as usize;
    let stored = u32::from_le_bytes(b[len - 4..len].try_into().expect("4"));
    if crc32fast::hash(&b[..len - 4]) != stored {
        return Err(corrupt(what, "bad checksum"));
    }
    Ok(&b[16..len - 4])
}

fn frame(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let len = 16 + body.len() + 4;
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(magic);
    v.extend_from_slice(&(len as u64).to_le_bytes());
    v.extend_from_slice(body);
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

impl Root {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.entries.len() * 64);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.pool_id);
        b.extend_from_slice(&self.next_dataset_id.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            b.extend_from_slice(&e.dataset_id.to_le_bytes());
            b.extend_from_slice(&e.manifest_rows.offset.to_le_bytes());
            b.extend_from_slice(&e.manifest_rows.len.to_le_bytes());
            b.extend_from_slice(&e.manifest_bytes.to_le_bytes());
            b.extend_from_slice(&e.manifest_crc.to_le_bytes());
            put_str16(&mut b, &e.name);
        }
        b.extend_from_slice(&(self.replaced.len() as u32).to_le_bytes());
        for (index, path) in &self.replaced {
            b.extend_from_slice(&index.to_le_bytes());
            put_str16(&mut b, path);
        }
        match &self.replacing {
            None => b.push(0),
            Some(r) => {
                b.push(1);
                b.extend_from_slice(&(r.len() as u32).to_le_bytes());
                b.extend_from_slice(r);
            }
        }
        frame(&ROOT_MAGIC, &b)
    }

    pub fn decode(b: &[u8]) -> Result<Self, PoolMetaError> {
        let body = unframe(b, &ROOT_MAGIC, "pool root")?;
        let mut r = Reader {
            b: body,
            what: "pool root",
        };
        let generation = r.u64()?;
        let pool_id: [u8; 16] = r.take(16)?.try_into().expect("16");
        let next_dataset_id = r.u64()?;
        let n = r.u32()? as usize;
        let mut entries = Vec::with_capacity(n.min(body.len() / 38));
        for _ in 0..n {
            entries.push(RootEntry {
                dataset_id: r.u64()?,
                manifest_rows: Extent {
                    offset: r.u64()?,
                    len: r.u64()?,
                },
                manifest_bytes: r.u64()?,
                manifest_crc: r.u32()?,
                name: r.str16()?,
            });
        }
        let n = r.u32()? as usize;
        let mut replaced = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            replaced.push((r.u32()?, r.str16()?));
        }
        let replacing = match r.take(1)?[0] {
            0 => None,
            1 => {
                let n = r.u32()? as usize;
                Some(r.take(n)?.to_vec())
            }
            f => {
                return Err(corrupt(
                    "pool root",
                    format!("unknown replacement flag {f}"),
                ));
            }
        };
        if !r.b.is_empty() {
            return Err(corrupt("pool root", "bytes after the last entry"));
        }
        Ok(Self {
            generation,
            pool_id,
            next_dataset_id,
            entries,
            replaced,
            replacing,
        })
    }
}

/// One dataset's catalog entries, as stored on the devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub record: DatasetRecord,
    pub objects: Vec<(String, ObjectRecord)>,
    pub unit_crcs: Vec<u32>,
}

fn catalog_corrupt(e: CatalogError) -> PoolMetaError {
    corrupt("manifest", e.to_string())
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.objects.len() * 64);
        put_str16(&mut b, &self.name);
        let rec = self.record.encode();
        b.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        b.extend_from_slice(&rec);
        b.extend_from_slice(&(self.objects.len() as u64).to_le_bytes());
        for (path, o) in &self.objects {
            put_str16(&mut b, path);
            let o = o.encode();
            b.extend_from_slice(&(o.len() as u32).to_le_bytes());
            b.extend_from_slice(&o);
        }
        b.extend_from_slice(&(self.unit_crcs.len() as u64).to_le_bytes());
        for c in &self.unit_crcs {
            b.extend_from_slice(&c.to_le_bytes());
        }
        frame(&MANIFEST_MAGIC, &b)
    }

    /// `encode().len()`, without encoding (sizing its rows).
    pub fn encoded_len(&self) -> usize {
        let str16 = |s: &str| 2 + s.len().min(u16::MAX as usize);
        16 + str16(&self.name)
            + 4
            + self.record.encode().len()
            + 8
            + self
                .objects
                .iter()
                .map(|(p, o)| str16(p) + 4 + 28 + 4 * o.block_crcs.len())
                .sum::<usize>()
            + 8
            + 4 * self.unit_crcs.len()
            + 4
    }

    pub fn decode(b: &[u8]) -> Result<Self, PoolMetaError> {
        let body = unframe(b, &MANIFEST_MAGIC, "manifest")?;
        let mut r = Reader {
            b: body,
            what: "manifest",
        };
        let name = r.str16()?;
        let n = r.u32()? as usize;
        let record = DatasetRecord::decode(r.take(n)?).map_err(catalog_corrupt)?;
        let count = r.u64()?;
        // Each object takes at least 2 + 4 + 28 bytes: a count that cannot
        // fit is refused before anything is reserved for it.
        if count > (body.len() / 34) as u64 {
            return Err(corrupt("manifest", format!("{count} objects cannot fit")));
        }
        let mut objects = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let path = r.str16()?;
            let n = r.u32()? as usize;
            objects.push((
                path,
                ObjectRecord::decode(r.take(n)?).map_err(catalog_corrupt)?,
            ));
        }
        let crcs = r.u64()?;
        if crcs > (r.b.len() / 4) as u64 {
            return Err(corrupt(
                "manifest",
                format!("{crcs} unit checksums cannot fit"),
            ));
        }
        let unit_crcs = (0..crcs).map(|_| r.u32()).collect::<Result<_, _>>()?;
        if !r.b.is_empty() {
            return Err(corrupt("manifest", "bytes after the unit checksums"));
        }
        Ok(Self {
            name,
            record,
            objects,
            unit_crcs,
        })
    }
}

/// Rows of `layout` that hold `bytes` on each device (at least one).
pub fn manifest_rows_len(layout: StripeLayout, bytes: u64) -> u64 {
    let unit = layout.stripe_unit_bytes;
    bytes.div_ceil(unit).max(1) * unit * u64::from(layout.device_count)
}

/// `bytes` in a page-aligned buffer, zero-padded to whole 4 KiB blocks.
fn aligned(bytes: &[u8]) -> std::io::Result<MmapMut> {
    let len = bytes.len().next_multiple_of(ALIGN).max(ALIGN);
    let mut m = MmapMut::map_anon(len)?;
    m[..bytes.len()].copy_from_slice(bytes);
    Ok(m)
}

/// The devices' O_DIRECT descriptors (`None`: missing), for metadata.
#[derive(Debug)]
pub struct MetaDevices {
    pub files: Vec<Option<Arc<dyn DeviceFile>>>,
    pub layout: StripeLayout,
}

impl MetaDevices {
    /// Over plain files (`None`: missing).
    pub fn from_files(files: Vec<Option<File>>, layout: StripeLayout) -> Self {
        Self {
            files: files
                .into_iter()
                .map(|f| f.map(|f| Arc::new(f) as Arc<dyn DeviceFile>))
                .collect(),
            layout,
        }
    }

    fn present(&self) -> impl Iterator<Item = (u32, &dyn DeviceFile)> {
        self.files
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_deref().map(|f| (i as u32, f)))
    }

    /// Where device copies of `rows` start on each device.
    fn share_offset(&self, rows: Extent) -> u64 {
        let row = self.layout.stripe_unit_bytes * u64::from(self.layout.device_count);
        self.layout.data_offset_bytes + rows.offset / row * self.layout.stripe_unit_bytes
    }

    /// Writes `manifest` (encoded) into each present device's share of
    /// `rows` and syncs it.
    pub fn write_manifest(&self, rows: Extent, encoded: &[u8]) -> Result<(), PoolMetaError> {
        let share = rows.len / u64::from(self.layout.device_count);
        assert!(encoded.len() as u64 <= share, "manifest rows too small");
        let buf = aligned(encoded).map_err(|source| PoolMetaError::Io { device: 0, source })?;
        let at = self.share_offset(rows);
        for (device, f) in self.present() {
            f.write_all_at(&buf[..], at)
                .and_then(|()| f.sync_data())
                .map_err(|source| PoolMetaError::Io { device, source })?;
        }
        Ok(())
    }

    /// Writes `encoded` into device `device`'s share of `rows` only (a
    /// replaced device catching up) and syncs it.
    pub fn write_manifest_to(
        &self,
        device: u32,
        rows: Extent,
        encoded: &[u8],
    ) -> Result<(), PoolMetaError> {
        let Some(Some(f)) = self.files.get(device as usize) else {
            return Ok(());
        };
        let buf = aligned(encoded).map_err(|source| PoolMetaError::Io { device, source })?;
        f.write_all_at(&buf[..], self.share_offset(rows))
            .and_then(|()| f.sync_data())
            .map_err(|source| PoolMetaError::Io { device, source })
    }

    /// The manifest `entry` names, from the first present device whose
    /// copy checks out.
    pub fn read_manifest(&self, entry: &RootEntry) -> Result<Manifest, PoolMetaError> {
        let lost = |why: String| PoolMetaError::ManifestLost {
            name: entry.name.clone(),
            id: entry.dataset_id,
            why,
        };
        let share = entry.manifest_rows.len / u64::from(self.layout.device_count);
        if entry.manifest_bytes > share {
            return Err(lost(format!(
                "{} bytes do not fit its rows",
                entry.manifest_bytes
            )));
        }
        let len = (entry.manifest_bytes as usize)
            .next_multiple_of(ALIGN)
            .max(ALIGN);
        let mut buf = MmapMut::map_anon(len).map_err(|e| lost(e.to_string()))?;
        let at = self.share_offset(entry.manifest_rows);
        let mut why = Vec::new();
        for (device, f) in self.present() {
            if let Err(e) = f.read_exact_at(&mut buf[..], at) {
                why.push(format!("device {device}: {e}"));
                continue;
            }
            let bytes = &buf[..entry.manifest_bytes as usize];
            if crc32fast::hash(bytes) != entry.manifest_crc {
                why.push(format!("device {device}: bad checksum"));
                continue;
            }
            match Manifest::decode(bytes) {
                Ok(m) if m.record.id == entry.dataset_id && m.name == entry.name => return Ok(m),
                Ok(_) => why.push(format!("device {device}: a different dataset's manifest")),
                Err(e) => why.push(format!("device {device}: {e}")),
            }
        }
        Err(lost(why.join("; ")))
    }

    /// Writes `root` into slot `generation mod 2` of every present device
    /// and syncs each.
    pub fn write_root(&self, root: &Root) -> Result<(), PoolMetaError> {
        let encoded = root.encode();
        if encoded.len() as u64 > ROOT_SLOT_BYTES {
            return Err(PoolMetaError::RootFull {
                needed: encoded.len(),
                max: ROOT_SLOT_BYTES,
                datasets: root.entries.len(),
            });
        }
        let buf = aligned(&encoded).map_err(|source| PoolMetaError::Io { device: 0, source })?;
        let at = ROOT_AREA_OFFSET + (root.generation % 2) * ROOT_SLOT_BYTES;
        for (device, f) in self.present() {
            f.write_all_at(&buf[..], at)
                .and_then(|()| f.sync_data())
                .map_err(|source| PoolMetaError::Io { device, source })?;
        }
        Ok(())
    }

    /// The newest root of `pool_id` on any present device: the valid slot
    /// with the highest generation. `None` when no device has one (a new
    /// pool, or one from before roots).
    pub fn read_newest_root(&self, pool_id: [u8; 16]) -> Option<Root> {
        let mut best: Option<Root> = None;
        let Ok(mut buf) = MmapMut::map_anon(ROOT_SLOT_BYTES as usize) else {
            return None;
        };
        for (device, f) in self.present() {
            for slot in 0..2 {
                let at = ROOT_AREA_OFFSET + slot * ROOT_SLOT_BYTES;
                if f.read_exact_at(&mut buf[..], at).is_err() {
                    continue;
                }
                if buf[..8] != ROOT_MAGIC[..] {
                    continue;
                }
                match Root::decode(&buf[..]) {
                    Ok(r) if r.pool_id == pool_id => {
                        if best.as_ref().is_none_or(|b| r.generation > b.generation) {
                            best = Some(r);
                        }
                    }
                    Ok(_) => tracing::warn!(device, slot, "a pool root of another pool; ignored"),
                    Err(e) => {
                        tracing::warn!(device, slot, error = %e, "a damaged pool root; ignored")
                    }
                }
            }
        }
        best
    }
}

/// The newest root on any of `paths` that holds a superblock of ours,
/// read-only, before the pool is assembled (a start without its catalog
/// learns from it where replaced devices are). `None` when none has one.
pub fn peek_root(paths: &[std::path::PathBuf]) -> Option<Root> {
    let mut best: Option<Root> = None;
    for path in paths {
        let Ok((file, crate::device::Probe::Ours(sb))) = crate::device::probe_read_only(path)
        else {
            continue;
        };
        let layout = sb.layout();
        let mut files: Vec<Option<File>> = (0..layout.device_count).map(|_| None).collect();
        if let Some(slot) = files.get_mut(sb.device_index as usize) {
            *slot = Some(file);
        }
        let one = MetaDevices::from_files(files, layout);
        if let Some(r) = one.read_newest_root(sb.pool_id)
            && best.as_ref().is_none_or(|b| r.generation > b.generation)
        {
            best = Some(r);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::DatasetRecord;
    use storaged_proto::model::StorageClass;

    fn manifest() -> Manifest {
        Manifest {
            name: "train".into(),
            record: DatasetRecord {
                id: 7,
                class: StorageClass::Ec {
                    data_units: 3,
                    parity_units: 1,
                },
                checksum_block_bytes: 32768,
                created_unix_ms: 1,
                object_count: 2,
                total_bytes: 70000,
                allocated_bytes: 1 << 20,
                extents: vec![Extent {
                    offset: 0,
                    len: 1 << 20,
                }],
                owner: "vision".into(),
                manifest: Some(Extent {
                    offset: 1 << 20,
                    len: 1 << 20,
                }),
                unit_rows: 2,
            },
            objects: vec![
                (
                    "a/1".into(),
                    ObjectRecord {
                        size: 5,
                        logical_offset: 0,
                        crc32: 9,
                        block_crcs: vec![9],
                    },
                ),
                (
                    "b".into(),
                    ObjectRecord {
                        size: 69995,
                        logical_offset: 4096,
                        crc32: 3,
                        block_crcs: vec![1, 2, 3],
                    },
                ),
            ],
            unit_crcs: vec![1, 2, 3, 4],
        }
    }

    fn root() -> Root {
        Root {
            generation: 3,
            pool_id: [5; 16],
            next_dataset_id: 8,
            entries: vec![RootEntry {
                name: "train".into(),
                dataset_id: 7,
                manifest_rows: Extent {
                    offset: 1 << 20,
                    len: 1 << 20,
                },
                manifest_bytes: 300,
                manifest_crc: 0xabcd,
            }],
            replaced: vec![(2, "/dev/disk/by-id/nvme-new".into())],
            replacing: Some(vec![1, 2, 3]),
        }
    }

    #[test]
    fn round_trips() {
        let m = manifest();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.encoded_len(), m.encode().len());
        let r = root();
        assert_eq!(Root::decode(&r.encode()).unwrap(), r);
        // Trailing zero padding (a slot, a device share) is ignored.
        let mut padded = r.encode();
        padded.resize(8192, 0);
        assert_eq!(Root::decode(&padded).unwrap(), r);
    }

    #[test]
    fn damage_is_named_never_a_panic() {
        for enc in [manifest().encode(), root().encode()] {
            for cut in 0..enc.len() {
                assert!(Manifest::decode(&enc[..cut]).is_err());
                assert!(Root::decode(&enc[..cut]).is_err());
            }
            for i in 0..enc.len() {
                let mut bad = enc.clone();
                bad[i] ^= 0x40;
                assert!(Manifest::decode(&bad).is_err() && Root::decode(&bad).is_err());
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        // Guards against decoders that panic or over-allocate on arbitrary
        // bytes (a damaged device can hold anything).
        #[test]
        fn arbitrary_bytes_decode_or_fail(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), fix in proptest::prelude::any::<bool>()) {
            let mut b = bytes;
            if fix && b.len() >= 20 {
                // Valid framing around random contents: the body parser runs.
                b[..8].copy_from_slice(&MANIFEST_MAGIC);
                let len = b.len() as u64;
                b[8..16].copy_from_slice(&len.to_le_bytes());
                let n = b.len();
                let crc = crc32fast::hash(&b[..n - 4]);
                b[n - 4..].copy_from_slice(&crc.to_le_bytes());
                let _ = Manifest::decode(&b);
                b[..8].copy_from_slice(&ROOT_MAGIC);
                let crc = crc32fast::hash(&b[..n - 4]);
                b[n - 4..].copy_from_slice(&crc.to_le_bytes());
                if let Ok(r) = Root::decode(&b) {
                    proptest::prop_assert_eq!(Root::decode(&r.encode()).unwrap(), r);
                }
            } else {
                let _ = Manifest::decode(&b);
                let _ = Root::decode(&b);
            }
        }
    }
}
