//! Validated domain types converted from wire messages with `TryFrom`.
//!
//! The rules here are the protocol's contract: a dataset name is 1 to 128
//! bytes of `[A-Za-z0-9._-]`; an object path is a relative, `/`-separated
//! path of at most 4096 bytes whose components are neither empty, `.` nor
//! `..`, with no NUL byte. Paths that pass can be joined under an export
//! directory without escaping it.

use std::fmt;

use crate::pb;

/// Longest dataset name, in bytes.
pub const DATASET_NAME_BYTES_MAX: usize = 128;
/// Longest object path, in bytes.
pub const OBJECT_PATH_BYTES_MAX: usize = 4096;

/// Why a name or request was rejected. Every variant maps to
/// `INVALID_ARGUMENT` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("dataset name is empty")]
    DatasetEmpty,
    #[error("dataset name is {0} bytes; the limit is {DATASET_NAME_BYTES_MAX}")]
    DatasetTooLong(usize),
    #[error("dataset name {0:?} contains {1:?}; only [A-Za-z0-9._-] are allowed")]
    DatasetBadChar(String, char),
    #[error(
        "dataset name {0:?} is not allowed: names may not be \".\" or \"..\" or start with '-'"
    )]
    DatasetReserved(String),
    #[error("object path is empty")]
    PathEmpty,
    #[error("object path is {0} bytes; the limit is {OBJECT_PATH_BYTES_MAX}")]
    PathTooLong(usize),
    #[error("object path {0:?} is absolute; paths are relative to the dataset root")]
    PathAbsolute(String),
    #[error("object path {0:?} contains a NUL byte")]
    PathNul(String),
    #[error("object path {0:?} has a {1:?} component")]
    PathBadComponent(String, String),
    #[error("object path {0:?} contains the control character {1:?}")]
    PathControl(String, char),
    #[error("storage class {0} is not supported")]
    StorageClass(i32),
    #[error("storage class {0:?} is not valid: use stripe or ec:K+M (for example ec:4+1)")]
    StorageClassName(String),
}

/// A dataset name that satisfies the protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatasetName(String);

impl DatasetName {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NameError::DatasetEmpty);
        }
        if name.len() > DATASET_NAME_BYTES_MAX {
            return Err(NameError::DatasetTooLong(name.len()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::DatasetBadChar(name, c));
        }
        // "." and ".." mean directories to every tool that meets the name
        // (export, mount); a leading '-' reads as an option to them.
        if name == "." || name == ".." || name.starts_with('-') {
            return Err(NameError::DatasetReserved(name));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for DatasetName {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

/// An object path that satisfies the protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectPath(String);

impl ObjectPath {
    pub fn new(path: impl Into<String>) -> Result<Self, NameError> {
        let path = path.into();
        if path.is_empty() {
            return Err(NameError::PathEmpty);
        }
        if path.len() > OBJECT_PATH_BYTES_MAX {
            return Err(NameError::PathTooLong(path.len()));
        }
        if path.contains('\0') {
            return Err(NameError::PathNul(path));
        }
        // Control characters (escape sequences among them) would reach
        // terminals and file names raw.
        if let Some(c) = path.chars().find(|c| c.is_control()) {
            return Err(NameError::PathControl(path, c));
        }
        if path.starts_with('/') {
            return Err(NameError::PathAbsolute(path));
        }
        if let Some(bad) = path
            .split('/')
            .find(|c| c.is_empty() || *c == "." || *c == "..")
        {
            let bad = bad.to_owned();
            return Err(NameError::PathBadComponent(path, bad));
        }
        Ok(Self(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for ObjectPath {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

/// How a dataset's bytes are laid out over the pool's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageClass {
    /// RAID-0 striping, no redundancy.
    Stripe,
    /// Reed-Solomon: `data_units` data and `parity_units` parity stripe units
    /// per stripe, each on a different device. The bounds are the server's
    /// to check (they depend on the pool).
    Ec { data_units: u8, parity_units: u8 },
}

impl StorageClass {
    /// The byte stored in the catalog (docs/FORMAT.md).
    pub fn code(self) -> u8 {
        match self {
            StorageClass::Stripe => 1,
            StorageClass::Ec { .. } => 2,
        }
    }

    /// Parses `stripe` or `ec:K+M`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let bad = || NameError::StorageClassName(s.to_owned());
        if s == "stripe" {
            return Ok(StorageClass::Stripe);
        }
        let (k, m) = s
            .strip_prefix("ec:")
            .and_then(|km| km.split_once('+'))
            .ok_or_else(bad)?;
        let unit = |x: &str| x.parse::<u8>().ok().filter(|v| *v > 0);
        Ok(StorageClass::Ec {
            data_units: unit(k).ok_or_else(bad)?,
            parity_units: unit(m).ok_or_else(bad)?,
        })
    }

    /// The class an ingest asks for; `None` means "the server's default".
    pub fn from_wire(
        class: i32,
        data_units: u32,
        parity_units: u32,
    ) -> Result<Option<Self>, NameError> {
        match pb::StorageClass::try_from(class) {
            Ok(pb::StorageClass::Unspecified) => Ok(None),
            Ok(pb::StorageClass::Stripe) => Ok(Some(StorageClass::Stripe)),
            Ok(pb::StorageClass::Ec) => {
                let unit = |v: u32| u8::try_from(v).ok().filter(|v| *v > 0);
                match (unit(data_units), unit(parity_units)) {
                    (Some(data_units), Some(parity_units)) => Ok(Some(StorageClass::Ec {
                        data_units,
                        parity_units,
                    })),
                    _ => Err(NameError::StorageClassName(format!(
                        "ec:{data_units}+{parity_units}"
                    ))),
                }
            }
            Err(_) => Err(NameError::StorageClass(class)),
        }
    }

    /// `(class, data_units, parity_units)` as the wire carries them.
    pub fn to_wire(self) -> (pb::StorageClass, u32, u32) {
        match self {
            StorageClass::Stripe => (pb::StorageClass::Stripe, 0, 0),
            StorageClass::Ec {
                data_units,
                parity_units,
            } => (
                pb::StorageClass::Ec,
                u32::from(data_units),
                u32::from(parity_units),
            ),
        }
    }

    /// Whether losing one device loses no data.
    pub fn is_redundant(self) -> bool {
        matches!(self, StorageClass::Ec { .. })
    }
}

impl fmt::Display for StorageClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageClass::Stripe => f.write_str("stripe"),
            StorageClass::Ec {
                data_units,
                parity_units,
            } => write!(f, "ec:{data_units}+{parity_units}"),
        }
    }
}

impl std::str::FromStr for StorageClass {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The O_DIRECT alignment of device offsets, lengths and memory addresses:
/// the one 4 KiB constant that storaged's buffers, allocator, engines and
/// the `ReadInto` path (client regions) all derive from.
pub const DIRECT_IO_ALIGN_BYTES: usize = 4096;

/// Granularity of data checksums (CRC-32 IEEE): every 32 KiB block of an
/// object is verified before any of its bytes are served. Part of the wire
/// contract (reads are widened to whole blocks; `ReadInto` spans follow).
pub const CHECKSUM_BLOCK_BYTES: u32 = 32 * 1024;

/// Alignment of region offsets and spans on the `ReadInto` path.
pub const READ_INTO_ALIGN_BYTES: u64 = DIRECT_IO_ALIGN_BYTES as u64;

/// Largest item of an any-order `ReadBatch` (storaged holds each such item
/// whole while it waits to be sent); larger items fail with
/// RESOURCE_EXHAUSTED and must be read in order (`Read`, or an in-order
/// `ReadBatch`), which streams them in pieces. Shared so clients route
/// large objects before asking.
pub const BATCH_ANY_ORDER_ITEM_BYTES_MAX: u64 = 64 << 20;

/// Response metadata key storaged sets (to the region id, in hex) when a
/// call names a region it does not know: deregistered, or registered with
/// a storaged that has since restarted. A client that sees it registers a
/// fresh region rather than treating the call's NOT_FOUND as a missing
/// object or dataset.
pub const REGION_UNKNOWN_METADATA_KEY: &str = "storaged-region-unknown";

/// The `ReadInto` contract, shared by server and clients: reading object
/// bytes `[start, start + len)` of an object of `object_size` bytes uses
/// region bytes `[region_offset, region_offset + span)`, and byte `start`
/// lands at `region_offset + lead`. Returns `(span, lead)`.
///
/// The range is widened to whole checksum blocks (counted from the
/// object's start, cut at its end) so they can be verified in place, then
/// to [`READ_INTO_ALIGN_BYTES`] for O_DIRECT.
pub fn read_into_span(
    start: u64,
    len: u64,
    object_size: u64,
    checksum_block_bytes: u64,
) -> (u64, u64) {
    if len == 0 || checksum_block_bytes == 0 {
        return (0, 0);
    }
    let block_start = start - start % checksum_block_bytes;
    let block_end = (start + len)
        .next_multiple_of(checksum_block_bytes)
        .min(object_size)
        .max(block_start);
    (
        (block_end - block_start).next_multiple_of(READ_INTO_ALIGN_BYTES),
        start - block_start,
    )
}

/// A validated byte range of one object: `length` None means "to the end".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSpec {
    pub path: ObjectPath,
    pub offset: u64,
    pub length: Option<u64>,
}

/// A validated `ReadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSpec {
    pub dataset: DatasetName,
    pub range: RangeSpec,
}

impl TryFrom<&pb::ReadRequest> for ReadSpec {
    type Error = NameError;
    fn try_from(r: &pb::ReadRequest) -> Result<Self, Self::Error> {
        Ok(Self {
            dataset: DatasetName::new(r.dataset.as_str())?,
            range: RangeSpec {
                path: ObjectPath::new(r.path.as_str())?,
                offset: r.offset,
                length: r.length,
            },
        })
    }
}

impl TryFrom<&pb::ReadItem> for RangeSpec {
    type Error = NameError;
    fn try_from(r: &pb::ReadItem) -> Result<Self, Self::Error> {
        Ok(Self {
            path: ObjectPath::new(r.path.as_str())?,
            offset: r.offset,
            length: r.length,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_names() {
        assert!(DatasetName::new("imagenet-mini_v1.2").is_ok());
        assert!(DatasetName::new("a".repeat(128)).is_ok());
        assert_eq!(DatasetName::new(""), Err(NameError::DatasetEmpty));
        assert_eq!(
            DatasetName::new("a".repeat(129)),
            Err(NameError::DatasetTooLong(129))
        );
        assert!(matches!(
            DatasetName::new("a/b"),
            Err(NameError::DatasetBadChar(_, '/'))
        ));
        assert!(DatasetName::new("é").is_err());
        assert!(DatasetName::new("a b").is_err());
        // Guards against names tools read as directories or options.
        for reserved in [".", "..", "-rf", "--help", "-"] {
            assert!(
                matches!(
                    DatasetName::new(reserved),
                    Err(NameError::DatasetReserved(_))
                ),
                "{reserved}"
            );
        }
        assert!(DatasetName::new("a-").is_ok() && DatasetName::new(".hidden").is_ok());
    }

    #[test]
    fn object_paths() {
        for ok in [
            "a",
            "train/n01440764/img_001.JPEG",
            "ünïcødé/файл",
            "a..b/.c",
        ] {
            assert!(ObjectPath::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/..",
            "./a",
            "a//b",
            "a/",
            "a\0b",
            // Guards against names that reach terminals raw.
            "a\x1b[2Jb",
            "line\nbreak",
            "tab\there",
            "del\x7f",
            "c1\u{9b}31m",
        ] {
            assert!(ObjectPath::new(bad).is_err(), "{bad:?}");
        }
        assert!(ObjectPath::new("a".repeat(4096)).is_ok());
        assert_eq!(
            ObjectPath::new("a".repeat(4097)),
            Err(NameError::PathTooLong(4097))
        );
    }

    #[test]
    fn storage_class_parse_and_wire() {
        assert_eq!(StorageClass::parse("stripe"), Ok(StorageClass::Stripe));
        let ec = StorageClass::Ec {
            data_units: 4,
            parity_units: 1,
        };
        assert_eq!(StorageClass::parse("ec:4+1"), Ok(ec));
        assert_eq!(ec.to_string(), "ec:4+1");
        for bad in [
            "", "ec", "ec:4", "ec:0+1", "ec:4+0", "ec:a+1", "raid5", "ec:300+1",
        ] {
            assert!(StorageClass::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(StorageClass::from_wire(0, 0, 0), Ok(None));
        assert_eq!(
            StorageClass::from_wire(1, 0, 0),
            Ok(Some(StorageClass::Stripe))
        );
        let (c, k, m) = ec.to_wire();
        assert_eq!(StorageClass::from_wire(c as i32, k, m), Ok(Some(ec)));
        assert!(StorageClass::from_wire(2, 0, 1).is_err());
        assert!(StorageClass::from_wire(2, 256, 1).is_err());
        assert_eq!(
            StorageClass::from_wire(7, 0, 0),
            Err(NameError::StorageClass(7))
        );
    }
}
