//! The catalog's records, byte by byte (docs/FORMAT.md): a dataset's
//! record (class, extents, owner, manifest locator) and an object's (size,
//! place, CRCs), with strict decoders that refuse reserved or trailing
//! bytes.

use super::*;

/// Version 2 added the owner (version 1 records read as owned by "").
pub(super) const DATASET_RECORD_VERSION: u8 = 3;
/// Longest owner (tenant) name a record holds.
pub const OWNER_BYTES_MAX: usize = 255;
const OBJECT_RECORD_VERSION: u8 = 1;

/// A committed dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRecord {
    pub id: u64,
    pub class: StorageClass,
    pub checksum_block_bytes: u32,
    pub created_unix_ms: i64,
    pub object_count: u64,
    pub total_bytes: u64,
    pub allocated_bytes: u64,
    /// Logical extents holding the dataset's objects, coalesced.
    pub extents: Vec<Extent>,
    /// The tenant that created it ("" without tenants); quotas count it.
    pub owner: String,
    /// Whole rows holding a copy of the dataset's manifest on every device
    /// (see `poolmeta`); `None` for records from before manifests.
    pub manifest: Option<Extent>,
    /// Check values per `ec` unit: the rows of a unit each have a CRC
    /// (`unit_bytes / ec::UNIT_ROW_BYTES` of them), or 1, one CRC over
    /// the whole unit (records from before row CRCs, and `stripe`).
    pub unit_rows: u32,
}

impl DatasetRecord {
    /// Every extent the dataset owns: its data and its manifest.
    pub fn owned_extents(&self) -> Vec<Extent> {
        let mut v = self.extents.clone();
        v.extend(self.manifest);
        v
    }
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRecord {
    pub size: u64,
    pub logical_offset: u64,
    pub crc32: u32,
    /// CRC-32 of each checksum block of the object, in order.
    pub block_crcs: Vec<u32>,
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CatalogError> {
        if self.b.len() < n {
            return Err(CatalogError::Corrupt(
                self.what.into(),
                "record is truncated".into(),
            ));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, CatalogError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CatalogError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, CatalogError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

impl DatasetRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48 + self.extents.len() * 16);
        v.push(DATASET_RECORD_VERSION);
        v.push(self.class.code());
        match self.class {
            StorageClass::Stripe => v.extend_from_slice(&[0, 0]),
            StorageClass::Ec {
                data_units,
                parity_units,
            } => v.extend_from_slice(&[data_units, parity_units]),
        }
        v.extend_from_slice(&self.checksum_block_bytes.to_le_bytes());
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        v.extend_from_slice(&self.object_count.to_le_bytes());
        v.extend_from_slice(&self.total_bytes.to_le_bytes());
        v.extend_from_slice(&self.allocated_bytes.to_le_bytes());
        v.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for e in &self.extents {
            v.extend_from_slice(&e.offset.to_le_bytes());
            v.extend_from_slice(&e.len.to_le_bytes());
        }
        let owner = &self.owner.as_bytes()[..self.owner.len().min(OWNER_BYTES_MAX)];
        v.push(owner.len() as u8);
        v.extend_from_slice(owner);
        match self.manifest {
            None => v.push(0),
            Some(e) => {
                v.push(1);
                v.extend_from_slice(&e.offset.to_le_bytes());
                v.extend_from_slice(&e.len.to_le_bytes());
            }
        }
        v.extend_from_slice(&self.unit_rows.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, CatalogError> {
        let mut r = Reader {
            b,
            what: "dataset record",
        };
        let version = r.u8()?;
        if !(1..=DATASET_RECORD_VERSION).contains(&version) {
            return Err(CatalogError::Corrupt(
                "dataset record".into(),
                format!("unknown version {version}"),
            ));
        }
        let class_code = r.u8()?;
        let (k, m) = (r.u8()?, r.u8()?);
        let class = match (class_code, k, m) {
            (1, 0, 0) => StorageClass::Stripe,
            (2, 1.., 1..) => StorageClass::Ec {
                data_units: k,
                parity_units: m,
            },
            _ => {
                return Err(CatalogError::Corrupt(
                    "dataset record".into(),
                    format!("unknown storage class {class_code} ({k}+{m})"),
                ));
            }
        };
        let checksum_block_bytes = r.u32()?;
        let id = r.u64()?;
        let created_unix_ms = r.u64()? as i64;
        let object_count = r.u64()?;
        let total_bytes = r.u64()?;
        let allocated_bytes = r.u64()?;
        let n = r.u32()? as usize;
        let mut extents = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            extents.push(Extent {
                offset: r.u64()?,
                len: r.u64()?,
            });
        }
        let owner = if version >= 2 {
            let n = r.u8()? as usize;
            String::from_utf8(r.take(n)?.to_vec()).map_err(|_| {
                CatalogError::Corrupt("dataset record".into(), "owner is not UTF-8".into())
            })?
        } else {
            String::new()
        };
        let manifest = if version >= 3 {
            match r.u8()? {
                0 => None,
                1 => Some(Extent {
                    offset: r.u64()?,
                    len: r.u64()?,
                }),
                f => {
                    return Err(CatalogError::Corrupt(
                        "dataset record".into(),
                        format!("unknown manifest flag {f}"),
                    ));
                }
            }
        } else {
            None
        };
        let unit_rows = if version >= 3 { r.u32()? } else { 1 };
        if unit_rows == 0 || unit_rows > 512 {
            return Err(CatalogError::Corrupt(
                "dataset record".into(),
                format!("{unit_rows} check values per unit"),
            ));
        }
        if !r.b.is_empty() {
            return Err(CatalogError::Corrupt(
                "dataset record".into(),
                format!("{} bytes after the record", r.b.len()),
            ));
        }
        Ok(Self {
            unit_rows,
            manifest,
            owner,
            id,
            class,
            checksum_block_bytes,
            created_unix_ms,
            object_count,
            total_bytes,
            allocated_bytes,
            extents,
        })
    }
}

impl ObjectRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(28 + self.block_crcs.len() * 4);
        v.push(OBJECT_RECORD_VERSION);
        v.extend_from_slice(&[0, 0, 0]);
        v.extend_from_slice(&self.crc32.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.logical_offset.to_le_bytes());
        v.extend_from_slice(&(self.block_crcs.len() as u32).to_le_bytes());
        for c in &self.block_crcs {
            v.extend_from_slice(&c.to_le_bytes());
        }
        v
    }

    /// Decodes the header only: size, offset and whole-object CRC.
    pub fn decode_summary(b: &[u8]) -> Result<(u64, u64, u32), CatalogError> {
        let mut r = Reader {
            b,
            what: "object record",
        };
        let version = r.u8()?;
        if version != OBJECT_RECORD_VERSION {
            return Err(CatalogError::Corrupt(
                "object record".into(),
                format!("unknown version {version}"),
            ));
        }
        r.take(3)?;
        let crc32 = r.u32()?;
        let size = r.u64()?;
        let logical_offset = r.u64()?;
        Ok((size, logical_offset, crc32))
    }

    pub fn decode(b: &[u8]) -> Result<Self, CatalogError> {
        let (size, logical_offset, crc32) = Self::decode_summary(b)?;
        let mut r = Reader {
            b: &b[24..],
            what: "object record",
        };
        let n = r.u32()? as usize;
        let raw = r.take(n.checked_mul(4).ok_or_else(|| {
            CatalogError::Corrupt("object record".into(), "block count overflows".into())
        })?)?;
        if !r.b.is_empty() || b[1..4] != [0, 0, 0] {
            return Err(CatalogError::Corrupt(
                "object record".into(),
                "reserved or trailing bytes are not empty".into(),
            ));
        }
        let block_crcs = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        Ok(Self {
            size,
            logical_offset,
            crc32,
            block_crcs,
        })
    }
}

/// Summary of an object for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSummary {
    pub path: String,
    pub size: u64,
    pub crc32: u32,
}
