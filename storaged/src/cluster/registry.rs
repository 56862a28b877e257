//! The cluster's datasets as a node serves them: a dataset's record and
//! its nodes' addresses for clients (`GetClusterDataset`), the list
//! (`ListDatasets` on a node in a cluster), `rm`, and the orphan sweep
//! that deletes unit datasets nobody records.
//!
//! Every answer read from the control plane is also kept here, so when
//! the control plane is out of reach reads of datasets this node has
//! served go on from its last copy (flagged `from_cache`), while ingest,
//! rm and membership changes fail UNAVAILABLE.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use storaged_proto::DatasetName;
use storaged_proto::cluster::UNIT_PREFIX;

use super::control::{ControlError, Write};
use super::member::{ClusterView, Member, STATUS_KEYS_MAX};
use super::records::{DatasetRecord, IngestIntent, decode};
use crate::store::Store;

/// A dataset's record with the addresses of its nodes (`None`: down).
#[derive(Debug, Clone)]
pub struct DatasetPlacement {
    pub record: DatasetRecord,
    pub addresses: Vec<Option<String>>,
    /// Answered from the cache: the control plane was out of reach.
    pub from_cache: bool,
}

/// Why a cluster dataset could not be found or removed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("no cluster dataset {0:?}")]
    NotFound(String),
}

/// The node's copy of what it last read.
#[derive(Debug, Default)]
pub struct RegistryCache {
    datasets: Mutex<BTreeMap<String, DatasetPlacement>>,
    /// The last full list.
    listed: Mutex<BTreeMap<String, DatasetRecord>>,
    /// When [`learn_unit`](RegistryCache::learn_unit) last listed.
    unit_listed_at: Mutex<Option<std::time::Instant>>,
}

/// How often a read of an unknown unit may list the cluster's datasets to
/// learn it: a caller naming made-up units costs the control plane one
/// list a second at most.
const UNIT_LEARN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The nodes' addresses in `record`'s order, from a view.
fn addresses(record: &DatasetRecord, view: &ClusterView) -> Vec<Option<String>> {
    record
        .nodes
        .iter()
        .map(|id| {
            view.nodes
                .iter()
                .find(|n| &n.node_id == id)
                .and_then(|n| n.live.as_ref().map(|l| l.advertise.clone()))
        })
        .collect()
}

impl RegistryCache {
    /// Dataset `name` and where its nodes are; from the cache when the
    /// control plane is unreachable.
    pub async fn dataset(
        &self,
        member: &Member,
        name: &str,
    ) -> Result<DatasetPlacement, RegistryError> {
        match member.control().get(&member.keys().dataset(name)).await {
            Ok(None) => {
                self.datasets.lock().expect("cache poisoned").remove(name);
                self.listed.lock().expect("cache poisoned").remove(name);
                Err(RegistryError::NotFound(name.to_owned()))
            }
            Ok(Some(entry)) => {
                let record: DatasetRecord = decode(&entry)?;
                let view = member.view().await?;
                let placement = DatasetPlacement {
                    addresses: addresses(&record, &view),
                    record,
                    from_cache: false,
                };
                self.datasets
                    .lock()
                    .expect("cache poisoned")
                    .insert(name.to_owned(), placement.clone());
                Ok(placement)
            }
            Err(e @ ControlError::Unreachable { .. }) => {
                let cached = self
                    .datasets
                    .lock()
                    .expect("cache poisoned")
                    .get(name)
                    .cloned();
                match cached {
                    Some(mut p) => {
                        p.from_cache = true;
                        Ok(p)
                    }
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every cluster dataset, and whether the list is this node's last
    /// copy (the control plane is out of reach: what the node listed or
    /// served last).
    pub async fn list(&self, member: &Member) -> Result<(Vec<DatasetRecord>, bool), ControlError> {
        match member
            .control()
            .list(&member.keys().datasets(), STATUS_KEYS_MAX)
            .await
        {
            Ok(entries) => {
                let records: Vec<DatasetRecord> =
                    entries.iter().map(decode).collect::<Result<_, _>>()?;
                *self.listed.lock().expect("cache poisoned") = records
                    .iter()
                    .map(|r| (r.name.clone(), r.clone()))
                    .collect();
                Ok((records, false))
            }
            Err(ControlError::Unreachable { .. }) => {
                let mut known = self.listed.lock().expect("cache poisoned").clone();
                for (name, p) in self.datasets.lock().expect("cache poisoned").iter() {
                    known.insert(name.clone(), p.record.clone());
                }
                Ok((known.into_values().collect(), true))
            }
            Err(e) => Err(e),
        }
    }

    /// The cluster dataset whose shares unit `unit` holds, as far as this
    /// node has read (`None`: no record it has seen names the unit).
    pub fn dataset_of_unit(&self, unit: &str) -> Option<String> {
        let listed = self.listed.lock().expect("cache poisoned");
        if let Some(r) = listed.values().find(|r| r.unit == unit) {
            return Some(r.name.clone());
        }
        drop(listed);
        self.datasets
            .lock()
            .expect("cache poisoned")
            .values()
            .find(|p| p.record.unit == unit)
            .map(|p| p.record.name.clone())
    }

    /// Makes sure [`dataset_of_unit`](Self::dataset_of_unit) knows `unit`
    /// if a record names it: lists the datasets when it does not (at most
    /// once per [`UNIT_LEARN_INTERVAL`]).
    pub async fn learn_unit(&self, member: &Member, unit: &str) {
        if self.dataset_of_unit(unit).is_some() {
            return;
        }
        {
            let mut at = self.unit_listed_at.lock().expect("cache poisoned");
            if at.is_some_and(|t| t.elapsed() < UNIT_LEARN_INTERVAL) {
                return;
            }
            *at = Some(std::time::Instant::now());
        }
        if let Err(e) = self.list(member).await {
            tracing::warn!(unit, error = %e, "cannot list the cluster's datasets to learn a unit");
        }
    }

    /// Removes cluster dataset `name`: deletes its record (the commit
    /// point); each node's sweep then deletes its unit.
    pub async fn remove(
        &self,
        member: &Member,
        name: &str,
    ) -> Result<DatasetRecord, RegistryError> {
        let key = member.keys().dataset(name);
        let control = member.control();
        let entry = control
            .get(&key)
            .await?
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        let record: DatasetRecord = decode(&entry)?;
        let removed = control
            .commit(
                vec![super::control::Condition::Unchanged {
                    key: key.clone(),
                    mod_revision: entry.mod_revision,
                }],
                vec![Write::Delete { key }],
            )
            .await?;
        if !removed {
            return Err(RegistryError::NotFound(name.to_owned()));
        }
        self.datasets.lock().expect("cache poisoned").remove(name);
        self.listed.lock().expect("cache poisoned").remove(name);
        Ok(record)
    }
}

/// Deletes this node's unit datasets that no dataset record and no
/// ingest under way names for this node; answers how many.
///
/// The local list is taken before the control plane is read: a unit
/// committed locally was preceded by its intent, so a unit this sweep
/// sees is named by the later snapshot unless its ingest is over and
/// failed (or its dataset was removed).
pub async fn sweep_orphans(member: &Member, store: &Arc<Store>) -> Result<usize, ControlError> {
    let local: Vec<String> = store
        .list_datasets()
        .iter()
        .map(|h| h.name.as_str().to_owned())
        .filter(|n| n.starts_with(UNIT_PREFIX))
        .collect();
    if local.is_empty() {
        return Ok(0);
    }
    let keys = member.keys();
    let entries = member.control().list(keys.root(), STATUS_KEYS_MAX).await?;
    // Named for this node: a unit whose dataset moved its share to
    // another node is an orphan here even though the dataset lives on.
    let me = member.node_id();
    let mut named = BTreeSet::new();
    for entry in &entries {
        if entry.key.starts_with(&keys.datasets()) {
            let r: DatasetRecord = decode(entry)?;
            if r.nodes.iter().any(|n| n == me) {
                named.insert(r.unit);
            }
        } else if entry.key.starts_with(&keys.ingests()) {
            let i: IngestIntent = decode(entry)?;
            if i.nodes.iter().any(|n| n == me) {
                named.insert(i.unit);
            }
        }
    }
    let mut deleted = 0;
    for unit in local.iter().filter(|u| !named.contains(*u)) {
        let Ok(name) = DatasetName::new(unit.clone()) else {
            continue;
        };
        match store.delete(&name).await {
            Ok(freed_bytes) => {
                deleted += 1;
                tracing::info!(unit = %unit, freed_bytes, "deleted an orphaned cluster unit (no dataset or ingest names it)");
            }
            Err(e) => tracing::warn!(unit = %unit, error = %e, "deleting an orphaned cluster unit"),
        }
    }
    Ok(deleted)
}

/// Sweeps at start and then every `interval`, for as long as the task
/// runs.
pub async fn sweep_forever(member: Arc<Member>, store: Arc<Store>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = sweep_orphans(&member, &store).await {
            tracing::debug!(error = %e, "orphan sweep skipped");
        }
    }
}
