//! How status messages look as JSON (`storagectl status --json`): serde
//! with the proto's own field names, and enums by name instead of number,
//! so the output reads like the proto and only ever gains fields.

use crate::pb;

/// A `StorageClass` field as its proto name (`STORAGE_CLASS_EC`).
pub fn storage_class<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    match pb::StorageClass::try_from(*v) {
        Ok(c) => s.serialize_str(c.as_str_name()),
        Err(_) => s.serialize_i32(*v),
    }
}
