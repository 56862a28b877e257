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
    #[error("storage class {0} is not supported")]
    StorageClass(i32),
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
}

impl StorageClass {
    /// The byte stored in the catalog (docs/FORMAT.md).
    pub fn code(self) -> u8 {
        match self {
            StorageClass::Stripe => 1,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(StorageClass::Stripe),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StorageClass::Stripe => "stripe",
        }
    }
}

impl TryFrom<i32> for StorageClass {
    type Error = NameError;
    fn try_from(v: i32) -> Result<Self, Self::Error> {
        match pb::StorageClass::try_from(v) {
            Ok(pb::StorageClass::Unspecified) | Ok(pb::StorageClass::Stripe) => {
                Ok(StorageClass::Stripe)
            }
            Err(_) => Err(NameError::StorageClass(v)),
        }
    }
}

impl From<StorageClass> for pb::StorageClass {
    fn from(c: StorageClass) -> Self {
        match c {
            StorageClass::Stripe => pb::StorageClass::Stripe,
        }
    }
}

/// Alignment of region offsets and spans on the `ReadInto` path.
pub const READ_INTO_ALIGN_BYTES: u64 = 4096;

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
    fn storage_class_codes() {
        assert_eq!(StorageClass::try_from(0), Ok(StorageClass::Stripe));
        assert_eq!(StorageClass::try_from(1), Ok(StorageClass::Stripe));
        assert_eq!(StorageClass::try_from(7), Err(NameError::StorageClass(7)));
        assert_eq!(
            StorageClass::from_code(StorageClass::Stripe.code()),
            Some(StorageClass::Stripe)
        );
        assert_eq!(StorageClass::from_code(0), None);
    }
}
