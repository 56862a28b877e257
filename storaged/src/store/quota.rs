//! Per-owner (tenant) quotas on stored bytes and datasets, checked before
//! anything is written: an ingest's datasets count when it begins, and
//! each object's declared size counts when its header arrives, so a
//! tenant over its quota fails before its first byte reaches a device.
//!
//! Usage is the owner's committed datasets (their `owner` in the catalog)
//! plus what its ingests in progress have declared; concurrent ingests of
//! one owner cannot together pass the quota.

use std::collections::HashMap;
use std::sync::Mutex;

/// The owner of an ingest and its limits (`None`: unlimited).
#[derive(Debug, Clone, Default)]
pub struct OwnerQuota {
    /// Tenant name ("" without tenants).
    pub owner: String,
    pub bytes_max: Option<u64>,
    pub datasets_max: Option<u64>,
}

/// What a quota refused.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(
        "tenant {owner:?} would hold {would} bytes; its quota is {limit} bytes (nothing was written)"
    )]
    Bytes {
        owner: String,
        would: u64,
        limit: u64,
    },
    #[error("tenant {owner:?} would hold {would} datasets; its quota is {limit}")]
    Datasets {
        owner: String,
        would: u64,
        limit: u64,
    },
}

/// Bytes and datasets declared by ingests in progress, per owner.
#[derive(Debug, Default)]
pub struct QuotaLedger {
    in_progress: Mutex<HashMap<String, (u64, u64)>>,
}

impl QuotaLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, u64)>> {
        self.in_progress.lock().expect("quota ledger poisoned")
    }

    /// Counts one more dataset for `q.owner`, whose committed datasets are
    /// `committed`, unless that passes its quota.
    pub fn begin_dataset(&self, q: &OwnerQuota, committed: u64) -> Result<(), QuotaError> {
        let mut m = self.lock();
        let entry = m.entry(q.owner.clone()).or_default();
        let would = committed + entry.1 + 1;
        if let Some(limit) = q.datasets_max
            && would > limit
        {
            if *entry == (0, 0) {
                m.remove(&q.owner);
            }
            return Err(QuotaError::Datasets {
                owner: q.owner.clone(),
                would,
                limit,
            });
        }
        entry.1 += 1;
        Ok(())
    }

    /// Counts `bytes` more for `q.owner`, whose committed bytes are
    /// `committed`, unless that passes its quota.
    pub fn add_bytes(&self, q: &OwnerQuota, committed: u64, bytes: u64) -> Result<(), QuotaError> {
        let mut m = self.lock();
        let entry = m.entry(q.owner.clone()).or_default();
        let would = committed.saturating_add(entry.0).saturating_add(bytes);
        if let Some(limit) = q.bytes_max
            && would > limit
        {
            return Err(QuotaError::Bytes {
                owner: q.owner.clone(),
                would,
                limit,
            });
        }
        entry.0 += bytes;
        Ok(())
    }

    /// An ingest of `owner` ended (committed or not): its declared bytes
    /// and its dataset leave the ledger (committed ones are in the catalog
    /// by now).
    pub fn end_dataset(&self, owner: &str, bytes: u64) {
        let mut m = self.lock();
        if let Some(e) = m.get_mut(owner) {
            e.0 = e.0.saturating_sub(bytes);
            e.1 = e.1.saturating_sub(1);
            if *e == (0, 0) {
                m.remove(owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_ingests_share_the_quota() {
        let l = QuotaLedger::default();
        let q = OwnerQuota {
            owner: "a".into(),
            bytes_max: Some(100),
            datasets_max: Some(2),
        };
        l.begin_dataset(&q, 0).unwrap();
        l.begin_dataset(&q, 0).unwrap();
        assert!(matches!(
            l.begin_dataset(&q, 0),
            Err(QuotaError::Datasets { would: 3, .. })
        ));
        l.add_bytes(&q, 40, 30).unwrap();
        l.add_bytes(&q, 40, 30).unwrap();
        let err = l.add_bytes(&q, 40, 1).unwrap_err();
        assert!(err.to_string().contains("101 bytes"), "{err}");
        l.end_dataset("a", 30);
        l.end_dataset("a", 30);
        assert!(l.lock().is_empty());
        // Without limits nothing is refused.
        let free = OwnerQuota::default();
        l.begin_dataset(&free, 1 << 40).unwrap();
        l.add_bytes(&free, u64::MAX, 5).unwrap();
    }
}
