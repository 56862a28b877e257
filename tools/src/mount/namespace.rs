//! What the mount shows: the datasets (every one as a top-level directory,
//! or one at the root), their trees, and the inode numbers of both.
//!
//! Each dataset the mount sees gets a slot, its id (which a pool never
//! reuses), and its nodes the inode `slot << 40 | (node + 1)`: node numbers
//! follow the listing, so an object has the same inode at every mount, and
//! a dataset removed and created again under the same name has another
//! slot (it is another dataset, with another id). Ids past the slot bits
//! (2^23 datasets) take slots from above them, in order of discovery. The dataset list is fetched
//! again when it is older than the refresh interval and someone looks at
//! the top level; a tree is listed once, on first use, and kept (datasets
//! are immutable).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use fuser::Errno;
use storaged_client::cluster::ClusterDataset;
use storaged_client::retry::Retrying;
use storaged_client::{Client, ClientError, Dataset};

use super::index::{NodeId, TREE_ROOT, Tree};
use super::reader::Source;

/// The mount's root directory.
pub const ROOT_INO: u64 = 1;
/// Inode bits of a node within its dataset.
const SLOT_SHIFT: u32 = 40;
/// Dataset ids below this are their own slots; the slots above are
/// handed out to larger ids.
const SLOT_BY_ID_MAX: u64 = 1 << 23;
/// How long a refresh of the dataset list tries while storaged is away.
const REFRESH_BUDGET: Duration = Duration::from_secs(2);
/// Objects per page of the listing a tree is built from (storaged's
/// largest page).
const LIST_PAGE_SIZE: u32 = 10_000;

/// A dataset as the mount knows it.
pub struct DatasetEntry {
    pub name: String,
    pub id: u64,
    pub created: SystemTime,
    /// Its storage class as storagectl writes it (`stripe`, `ec:4+2`).
    pub class: String,
    slot: u32,
    backing: Backing,
    tree: Mutex<Option<Arc<Tree>>>,
}

/// What a dataset of the mount is.
enum Backing {
    /// The node's own: reads go to this id only, never to a dataset
    /// created again under the name.
    Node(Arc<Dataset>),
    /// A cluster dataset (`unit` names this ingest of it), opened on
    /// first use; its layout never changes while it exists.
    Cluster {
        unit: String,
        opened: Mutex<Option<Arc<ClusterDataset>>>,
    },
}

impl DatasetEntry {
    /// The cluster unit of a cluster dataset; empty for the node's own.
    fn unit(&self) -> &str {
        match &self.backing {
            Backing::Node(_) => "",
            Backing::Cluster { unit, .. } => unit,
        }
    }
}

/// What an inode number names.
pub enum Inode {
    /// The top level of a mount of every dataset.
    Root,
    Node {
        dataset: Arc<DatasetEntry>,
        node: NodeId,
    },
}

#[derive(Debug, Clone)]
pub struct NamespaceOptions {
    /// Mount this dataset at the root instead of every one below it.
    pub dataset: Option<String>,
    /// How old the dataset list may be when the top level is read.
    pub refresh: Duration,
    /// Largest tree (objects and directories) of one dataset.
    pub entries_max: usize,
    /// How long listings wait for storaged to come back.
    pub retry_budget: Duration,
}

#[derive(Default)]
struct State {
    /// Every dataset seen, by slot.
    slots: HashMap<u32, Arc<DatasetEntry>>,
    /// The next slot for an id of `SLOT_BY_ID_MAX` or more.
    next_high_slot: u32,
    by_name: BTreeMap<String, u32>,
    refreshed: Option<Instant>,
}

pub struct Namespace {
    client: Client,
    runtime: tokio::runtime::Handle,
    options: NamespaceOptions,
    state: RwLock<State>,
    /// Held by the one caller refreshing the list.
    refreshing: Mutex<()>,
}

impl Namespace {
    /// Lists the datasets once; with `options.dataset`, fails unless that
    /// one exists.
    pub fn new(
        client: Client,
        runtime: tokio::runtime::Handle,
        options: NamespaceOptions,
    ) -> Result<Self, ClientError> {
        let ns = Self {
            client,
            runtime,
            options,
            state: RwLock::default(),
            refreshing: Mutex::default(),
        };
        ns.refresh(ns.options.retry_budget)?;
        if let Some(name) = &ns.options.dataset
            && ns.dataset(name).is_none()
        {
            return Err(ClientError::Status(tonic::Status::not_found(format!(
                "dataset {name:?} not found"
            ))));
        }
        Ok(ns)
    }

    pub fn single(&self) -> bool {
        self.options.dataset.is_some()
    }

    /// The inode of `node` of the dataset in `slot`.
    pub fn ino(&self, dataset: &DatasetEntry, node: NodeId) -> u64 {
        if self.single() && node == TREE_ROOT {
            return ROOT_INO;
        }
        (u64::from(dataset.slot) << SLOT_SHIFT) | (u64::from(node) + 1)
    }

    /// What `ino` names, if anything.
    pub fn resolve(&self, ino: u64) -> Option<Inode> {
        if ino == ROOT_INO {
            return match &self.options.dataset {
                None => Some(Inode::Root),
                Some(name) => Some(Inode::Node {
                    dataset: self.dataset_any(name)?,
                    node: TREE_ROOT,
                }),
            };
        }
        let slot = (ino >> SLOT_SHIFT) as u32;
        let node = ((ino & ((1 << SLOT_SHIFT) - 1)) as u32).checked_sub(1)?;
        let state = self.state.read().expect("namespace poisoned");
        let dataset = Arc::clone(state.slots.get(&slot)?);
        Some(Inode::Node { dataset, node })
    }

    /// The live dataset called `name`.
    pub fn dataset(&self, name: &str) -> Option<Arc<DatasetEntry>> {
        let state = self.state.read().expect("namespace poisoned");
        let slot = state.by_name.get(name)?;
        state.slots.get(slot).cloned()
    }

    /// The dataset called `name` when the mount began, removed or not (a
    /// single-dataset mount keeps its root).
    fn dataset_any(&self, name: &str) -> Option<Arc<DatasetEntry>> {
        let state = self.state.read().expect("namespace poisoned");
        state.slots.values().find(|d| d.name == name).cloned()
    }

    /// The live datasets in name order.
    pub fn datasets(&self) -> Vec<Arc<DatasetEntry>> {
        let state = self.state.read().expect("namespace poisoned");
        state
            .by_name
            .values()
            .filter_map(|slot| state.slots.get(slot).cloned())
            .collect()
    }

    /// Lists the datasets again when the list is older than the refresh
    /// interval. One caller refreshes while the others go on with the
    /// list they have; with storaged away it tries for `REFRESH_BUDGET`
    /// at most (a top-level `ls` must not hang for the whole retry
    /// budget), then keeps the old list (logged) until the next interval.
    pub fn refresh_if_stale(&self) {
        let stale = self
            .state
            .read()
            .expect("namespace poisoned")
            .refreshed
            .is_none_or(|at| at.elapsed() >= self.options.refresh);
        if !stale {
            return;
        }
        let Ok(_refreshing) = self.refreshing.try_lock() else {
            return;
        };
        if let Err(e) = self.refresh(REFRESH_BUDGET.min(self.options.retry_budget)) {
            tracing::warn!(error = %e, "cannot list the datasets; showing the last list");
            self.state.write().expect("namespace poisoned").refreshed = Some(Instant::now());
        }
    }

    fn refresh(&self, budget: Duration) -> Result<(), ClientError> {
        let policy = self.client.retry_policy().with_budget_only(budget);
        let list = self.runtime.block_on(within(
            budget,
            Retrying::new(policy).run(|| self.client.list_datasets()),
        ))?;
        let mut state = self.state.write().expect("namespace poisoned");
        let mut live = BTreeMap::new();
        for info in list {
            if let Some(only) = &self.options.dataset
                && *only != info.name
            {
                continue;
            }
            let known = state
                .by_name
                .get(&info.name)
                .and_then(|slot| state.slots.get(slot))
                .filter(|d| d.id == info.dataset_id && d.unit() == info.cluster_unit);
            let slot = match known {
                Some(d) => d.slot,
                None => {
                    let slot = if (1..SLOT_BY_ID_MAX).contains(&info.dataset_id) {
                        info.dataset_id as u32
                    } else {
                        state.next_high_slot = state.next_high_slot.max(SLOT_BY_ID_MAX as u32) + 1;
                        state.next_high_slot
                    };
                    // A server from before dataset ids sends 0 for its
                    // own: reads then go by name alone.
                    let backing = match info.dataset_id {
                        _ if !info.cluster_unit.is_empty() => Backing::Cluster {
                            unit: info.cluster_unit.clone(),
                            opened: Mutex::new(None),
                        },
                        0 => Backing::Node(Arc::new(self.client.dataset(&info.name)?)),
                        id => Backing::Node(Arc::new(self.client.dataset_pinned(&info.name, id)?)),
                    };
                    state.slots.insert(
                        slot,
                        Arc::new(DatasetEntry {
                            class: crate::class_name(&info),
                            created: std::time::UNIX_EPOCH
                                + Duration::from_millis(info.created_unix_ms.max(0) as u64),
                            id: info.dataset_id,
                            name: info.name.clone(),
                            slot,
                            backing,
                            tree: Mutex::new(None),
                        }),
                    );
                    slot
                }
            };
            live.insert(info.name, slot);
        }
        for (name, slot) in &state.by_name {
            if live.get(name) != Some(slot) {
                // Its open files read NOT_FOUND from storaged (the reads
                // are pinned to its id): nothing to mark here.
                tracing::info!(dataset = %name, "dataset removed (or created again); leaving the mount");
            }
        }
        state.by_name = live;
        state.refreshed = Some(Instant::now());
        Ok(())
    }

    /// The tree of `dataset`, listed on first use.
    pub fn tree(&self, dataset: &DatasetEntry) -> Result<Arc<Tree>, Errno> {
        let mut tree = dataset.tree.lock().expect("tree poisoned");
        if let Some(t) = &*tree {
            return Ok(Arc::clone(t));
        }
        let started = Instant::now();
        let listed = match self.source(dataset)? {
            Source::Node { dataset, .. } => self.runtime.block_on(self.list_all(&dataset)),
            Source::Cluster(cluster) => Ok(cluster
                .listing()
                .iter()
                .map(|o| (o.path.clone(), o.size, o.crc32))
                .collect()),
        };
        let objects = listed.map_err(|e| {
            tracing::error!(dataset = %dataset.name, error = %e, "cannot list the dataset");
            errno_of(&e)
        })?;
        let built = Tree::build(objects, self.options.entries_max).map_err(|e| {
            tracing::error!(dataset = %dataset.name, error = %e, "cannot index the dataset");
            Errno::EIO
        })?;
        tracing::info!(
            dataset = %dataset.name,
            files = built.files(),
            entries = built.len(),
            ms = started.elapsed().as_millis() as u64,
            "dataset indexed"
        );
        let built = Arc::new(built);
        *tree = Some(Arc::clone(&built));
        Ok(built)
    }

    /// Where the bytes of `dataset` come from; a cluster dataset's layout
    /// and manifest are read on first use (within the retry budget).
    pub fn source(&self, dataset: &DatasetEntry) -> Result<Source, Errno> {
        let (name, opened) = match &dataset.backing {
            Backing::Node(handle) => {
                return Ok(Source::Node {
                    dataset: Arc::clone(handle),
                    id: dataset.id,
                });
            }
            Backing::Cluster { opened, .. } => (&dataset.name, opened),
        };
        let mut opened = opened.lock().expect("cluster dataset poisoned");
        if let Some(cluster) = &*opened {
            return Ok(Source::Cluster(Arc::clone(cluster)));
        }
        let policy = self
            .client
            .retry_policy()
            .with_budget_only(self.options.retry_budget);
        let open = Retrying::new(policy).run(|| ClusterDataset::open(&self.client, name));
        let cluster = self
            .runtime
            .block_on(within(self.options.retry_budget, open))
            .map_err(|e| {
                tracing::error!(dataset = %name, error = %e, "cannot open the cluster dataset");
                errno_of(&e)
            })?;
        let cluster = Arc::new(cluster);
        *opened = Some(Arc::clone(&cluster));
        Ok(Source::Cluster(cluster))
    }

    /// Every object of `dataset` (path, size, CRC-32), page by page.
    async fn list_all(&self, dataset: &Dataset) -> Result<Vec<(String, u64, u32)>, ClientError> {
        let policy = self
            .client
            .retry_policy()
            .with_budget_only(self.options.retry_budget);
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = Retrying::new(policy).run(|| dataset.list_page("", LIST_PAGE_SIZE, &token));
            let (page, next) = within(self.options.retry_budget, page).await?;
            out.extend(page.into_iter().map(|o| (o.path, o.size, o.crc32)));
            if out.len() > self.options.entries_max {
                // Tree::build says so; no need to list the rest.
                return Ok(out);
            }
            match next {
                Some(t) => token = t,
                None => return Ok(out),
            }
        }
    }
}

/// How a failed listing or open answers the kernel.
fn errno_of(e: &ClientError) -> Errno {
    match e.code() {
        Some(tonic::Code::NotFound) => Errno::ENOENT,
        _ => Errno::EIO,
    }
}

/// `call`, failed DEADLINE_EXCEEDED once `budget` has passed: retries
/// bound how long storaged may be away, this how long it may be there and
/// silent (a hung process answers nothing, and fails nothing). Every call
/// the mount blocks a kernel request on goes through it (listings,
/// statfs, a direct reader's registration).
pub(super) async fn within<T>(
    budget: Duration,
    call: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(budget, call)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Status(tonic::Status::deadline_exceeded(
                format!("storaged did not answer within {budget:?}"),
            )))
        })
}
