//! A dataset's storage class as a type: how its bytes map onto the
//! devices, what a read does when a unit fails, how a scrub walks it, and
//! what the loss of devices puts at risk. Every place that used to ask
//! "is this dataset erasure coded?" asks its [`DatasetLayout`] instead, so a
//! new class is one new arm here (and its writer in `ingest`).

use storaged_proto::model::StorageClass;

use super::redundancy::EcDataset;
use crate::catalog::DatasetRecord;
use crate::error::StoreError;
use crate::layout::{Segment, StripeLayout};

/// How one committed dataset lies on the devices.
#[derive(Debug)]
pub enum DatasetLayout {
    /// Striped over every device with no redundancy (`stripe`).
    Stripe(StripeLayout),
    /// K data + M parity units per stripe (`ec:K+M`).
    Ec(Box<EcDataset>),
}

/// What a read does after reading a window's units directly failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultAction {
    /// Rebuild the window from parity.
    Rebuild,
    /// Read it again in storaged's memory (the bytes that failed were in a
    /// client's region, which the client may have spoiled).
    ReadAgain,
    /// Report the error.
    Fail,
}

impl DatasetLayout {
    pub fn for_record(record: &DatasetRecord, layout: StripeLayout) -> Self {
        match record.class {
            StorageClass::Stripe => Self::Stripe(layout),
            StorageClass::Ec { .. } => Self::Ec(Box::new(
                EcDataset::for_record(record, layout).expect("an ec record has a geometry"),
            )),
        }
    }

    /// The codec side of an erasure-coded dataset.
    pub fn ec(&self) -> Option<&EcDataset> {
        match self {
            Self::Stripe(_) => None,
            Self::Ec(ec) => Some(ec),
        }
    }

    /// Device pieces of dataset-space bytes `[at, at + len)`, cut at stripe
    /// units (the pool's address space for `stripe`, the data space for
    /// `ec`).
    pub fn segments(&self, at: u64, len: u64) -> Vec<Segment> {
        match self {
            Self::Stripe(layout) => layout.segments(at, len).collect(),
            Self::Ec(ec) => ec.map.segments(at, len).collect(),
        }
    }

    /// Devices it may lose and still serve every byte.
    pub fn losses_tolerated(&self) -> usize {
        match self {
            Self::Stripe(_) => 0,
            Self::Ec(ec) => ec.geometry().m(),
        }
    }

    /// Devices holding any of its bytes (`record`'s extents).
    pub fn devices_used(&self, record: &DatasetRecord, device_count: u32) -> Vec<bool> {
        match self {
            Self::Stripe(layout) => {
                let mut per_device = vec![0u64; device_count as usize];
                for e in &record.extents {
                    layout.bytes_per_device(e.offset, e.len, &mut per_device);
                }
                per_device.iter().map(|b| *b > 0).collect()
            }
            Self::Ec(ec) => ec.devices_used(device_count),
        }
    }

    /// What it can still serve without devices `gone` (those of it that are
    /// missing; not empty).
    pub fn health(&self, class: StorageClass, gone: &[u32]) -> String {
        match self {
            Self::Ec(_) if gone.len() <= self.losses_tolerated() => format!(
                "degraded: device(s) {gone:?} missing; reads rebuild from parity; {} more device loss(es) tolerated",
                self.losses_tolerated() - gone.len()
            ),
            Self::Ec(_) => format!(
                "unavailable: device(s) {gone:?} missing, {class} can rebuild at most {}",
                self.losses_tolerated()
            ),
            Self::Stripe(_) => format!(
                "at risk: objects with bytes on missing device(s) {gone:?} are unavailable (class stripe has no redundancy)"
            ),
        }
    }

    /// The read-fault policy: what follows a direct read of a window that
    /// failed with `error`; `in_client_memory` when the bytes were read
    /// into a client's region.
    pub(crate) fn on_read_fault(&self, error: &StoreError, in_client_memory: bool) -> FaultAction {
        if !error.is_device_fault() {
            return FaultAction::Fail;
        }
        match self {
            Self::Ec(_) => FaultAction::Rebuild,
            Self::Stripe(_) if in_client_memory && matches!(error, StoreError::Checksum { .. }) => {
                FaultAction::ReadAgain
            }
            Self::Stripe(_) => FaultAction::Fail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_error() -> StoreError {
        StoreError::Checksum {
            dataset: "d".into(),
            path: "p".into(),
            object_offset: 0,
            device: 0,
            device_offset: 0,
            expected: 1,
            actual: 2,
        }
    }

    fn layout() -> StripeLayout {
        StripeLayout {
            device_count: 4,
            stripe_unit_bytes: 1 << 20,
            data_offset_bytes: 1 << 20,
            device_data_bytes: 64 << 20,
        }
    }

    fn record(class: StorageClass) -> DatasetRecord {
        DatasetRecord {
            id: 1,
            class,
            checksum_block_bytes: 32 << 10,
            created_unix_ms: 0,
            object_count: 0,
            total_bytes: 0,
            allocated_bytes: 4 << 20,
            extents: vec![crate::alloc::Extent {
                offset: 0,
                len: 4 << 20,
            }],
            owner: String::new(),
            manifest: None,
            unit_rows: 1,
        }
    }

    #[test]
    fn the_read_fault_policy_by_class() {
        let stripe = DatasetLayout::Stripe(layout());
        let record = record(StorageClass::Ec {
            data_units: 2,
            parity_units: 1,
        });
        let ec = DatasetLayout::for_record(&record, layout());
        let mismatch = checksum_error();
        let not_a_fault = StoreError::ShuttingDown;
        assert_eq!(ec.on_read_fault(&mismatch, false), FaultAction::Rebuild);
        assert_eq!(ec.on_read_fault(&mismatch, true), FaultAction::Rebuild);
        assert_eq!(ec.on_read_fault(&not_a_fault, false), FaultAction::Fail);
        assert_eq!(stripe.on_read_fault(&mismatch, false), FaultAction::Fail);
        assert_eq!(
            stripe.on_read_fault(&mismatch, true),
            FaultAction::ReadAgain
        );
        assert_eq!(stripe.on_read_fault(&not_a_fault, true), FaultAction::Fail);
        assert_eq!(stripe.losses_tolerated(), 0);
        assert_eq!(ec.losses_tolerated(), 1);
        assert!(ec.health(record.class, &[1]).starts_with("degraded"));
        assert!(ec.health(record.class, &[1, 2]).starts_with("unavailable"));
        assert!(
            stripe
                .health(StorageClass::Stripe, &[1])
                .starts_with("at risk")
        );
    }
}
