//! One node's membership in a cluster: joining (identity checks, the
//! member record, the placement map), staying live (a lease kept alive,
//! the liveness record refreshed), leaving (the lease revoked), and the
//! cluster as the control plane sees it (`storagectl cluster status`).
//!
//! The node id belongs to one pool: the member record names the pool that
//! first joined under it, so a second node claiming the id is refused
//! whether or not the first is up. A node restarted after `kill -9` takes
//! its liveness key back at once (same pool), without waiting for the old
//! lease to expire. When the control plane is unreachable the node keeps
//! serving what it holds; it renews or re-takes its lease when the
//! control plane answers again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::binding::{Binding, BindingError};
use super::control::{Condition, ControlError, ControlPlane, LeaseId, Write};
use super::records::{
    ClusterRecord, Keys, LiveRecord, MemberRecord, MemberState, Placement, RECORD_FORMAT, decode,
    encode, unix_now_s,
};

/// Attempts at a compare-and-commit that others keep winning before
/// joining gives up (each loser re-reads and retries at once).
const COMMIT_ATTEMPTS_MAX: u32 = 16;

/// Most keys one cluster's status reads (members, live nodes, identity,
/// placement: a few per node).
pub const STATUS_KEYS_MAX: usize = 100_000;

/// A node's liveness record is rewritten at least this often even when
/// nothing changed, so `updated_unix_s` tells a wedged node apart.
const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// How a node joins.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub cluster_name: String,
    pub node_id: String,
    /// gRPC address clients and other nodes use for this node.
    pub advertise: String,
    pub bulk_advertise: Option<String>,
    /// Seconds the node's lease lasts without a keep-alive: how long a
    /// dead node still looks live.
    pub lease_ttl_s: u64,
    /// Where the binding file lives.
    pub data_dir: PathBuf,
    /// The node's device pool id (hex).
    pub pool_id: String,
    /// How this node calls the others.
    pub peers: super::peer::PeerLink,
    /// Seconds a member may be down before the repair rebuilds it (0:
    /// never), as this node runs it (for status).
    pub rebuild_after_s: u64,
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Binding(#[from] BindingError),
    #[error(
        "etcd has no cluster {cluster_name:?}, but this node's pool joined it (cluster id {cluster_id}): is --cluster the right etcd, or was its data lost? (remove {} from the data dir to join as a new node)",
        super::binding::BINDING_FILE
    )]
    ClusterMissing {
        cluster_name: String,
        cluster_id: String,
    },
    #[error(
        "this node's pool belongs to cluster {bound_name:?} (id {bound_id}), not to cluster {cluster_name:?}{}: a node of another cluster cannot join",
        cluster_id.as_deref().map(|id| format!(" (id {id}) in this etcd")).unwrap_or_default()
    )]
    OtherCluster {
        bound_name: String,
        bound_id: String,
        cluster_name: String,
        /// The other cluster's id, when it was read.
        cluster_id: Option<String>,
    },
    #[error(
        "this node's pool joined cluster {cluster_name:?} as node {bound:?}, not {asked:?}: start it with --node-id {bound}"
    )]
    NodeIdChanged {
        cluster_name: String,
        bound: String,
        asked: String,
    },
    #[error(
        "the data dir's cluster binding names pool {bound}, but its devices are pool {pool_id}"
    )]
    PoolChanged { bound: String, pool_id: String },
    #[error(
        "node id {node_id:?} in cluster {cluster_name:?} belongs to another node (pool {holder_pool}{}); this node's pool is {pool_id}: two nodes cannot share an id",
        live_at.as_deref().map(|a| format!(", live at {a}")).unwrap_or_default()
    )]
    NodeIdTaken {
        cluster_name: String,
        node_id: String,
        holder_pool: String,
        live_at: Option<String>,
        pool_id: String,
    },
    #[error("cluster {cluster_name:?}: {what} kept changing under {attempts} attempts")]
    Contended {
        cluster_name: String,
        what: &'static str,
        attempts: u32,
    },
}

/// The cluster as the control plane sees it now.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub cluster_name: String,
    pub cluster_id: String,
    pub placement: Placement,
    pub nodes: Vec<NodeView>,
}

/// One node: a member, live or not (or, briefly while it joins, live
/// before its member record is read back).
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node_id: String,
    pub member: Option<MemberRecord>,
    pub live: Option<LiveRecord>,
    /// Seconds left on the live node's lease.
    pub lease_ttl_s: Option<i64>,
    /// Since when it has been seen down (`down/<node>`), if it has.
    pub down_since_unix_s: Option<u64>,
}

/// What the heartbeat task knows.
#[derive(Debug)]
struct Heartbeat {
    lease: Option<LeaseId>,
    /// The last control-plane failure, while it lasts.
    control_error: Option<String>,
    /// (capacity, used) last written to the liveness record, and when.
    published: (u64, u64),
    published_at: Instant,
}

/// This node's membership.
pub struct Member {
    control: Arc<dyn ControlPlane>,
    keys: Keys,
    cluster_id: String,
    config: MemberConfig,
    started_unix_s: u64,
    /// (capacity, used) of the pool now.
    usage: Box<dyn Fn() -> (u64, u64) + Send + Sync>,
    heartbeat: Mutex<Heartbeat>,
    /// The cluster's datasets as last read (for control-plane outages).
    registry: super::registry::RegistryCache,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("cluster", &self.config.cluster_name)
            .field("node", &self.config.node_id)
            .field("control", &self.control.endpoint())
            .finish_non_exhaustive()
    }
}

impl Member {
    /// Joins the cluster (or rejoins it): checks that this pool may be
    /// this node of this cluster, records it as a member (and in the
    /// placement map) the first time, and takes the node's liveness key
    /// under a fresh lease. Fails without leaving anything half-done
    /// that a retry would trip on.
    pub async fn join(
        control: Arc<dyn ControlPlane>,
        config: MemberConfig,
        usage: Box<dyn Fn() -> (u64, u64) + Send + Sync>,
    ) -> Result<Arc<Member>, JoinError> {
        let keys = Keys::new(&config.cluster_name);
        let binding = Binding::load(&config.data_dir)?;
        if let Some(b) = &binding
            && b.cluster_name != config.cluster_name
        {
            // Refused before anything is read or written under the other
            // name (joining would create that cluster).
            return Err(JoinError::OtherCluster {
                bound_name: b.cluster_name.clone(),
                bound_id: b.cluster_id.clone(),
                cluster_name: config.cluster_name.clone(),
                cluster_id: None,
            });
        }
        let cluster = cluster_record(control.as_ref(), &keys, &config, binding.as_ref()).await?;
        if let Some(b) = &binding {
            if b.cluster_id != cluster.cluster_id {
                return Err(JoinError::OtherCluster {
                    bound_name: b.cluster_name.clone(),
                    bound_id: b.cluster_id.clone(),
                    cluster_name: config.cluster_name.clone(),
                    cluster_id: Some(cluster.cluster_id),
                });
            }
            if b.node_id != config.node_id {
                return Err(JoinError::NodeIdChanged {
                    cluster_name: config.cluster_name.clone(),
                    bound: b.node_id.clone(),
                    asked: config.node_id.clone(),
                });
            }
            if b.pool_id != config.pool_id {
                return Err(JoinError::PoolChanged {
                    bound: b.pool_id.clone(),
                    pool_id: config.pool_id.clone(),
                });
            }
        }
        let member = Arc::new(Member {
            control,
            keys,
            cluster_id: cluster.cluster_id.clone(),
            started_unix_s: unix_now_s(),
            usage,
            heartbeat: Mutex::new(Heartbeat {
                lease: None,
                control_error: None,
                published: (0, 0),
                published_at: Instant::now(),
            }),
            config,
            registry: Default::default(),
        });
        member.record_member().await?;
        Binding {
            format: RECORD_FORMAT,
            cluster_name: member.config.cluster_name.clone(),
            cluster_id: member.cluster_id.clone(),
            node_id: member.config.node_id.clone(),
            pool_id: member.config.pool_id.clone(),
        }
        .store(&member.config.data_dir)?;
        member.take_liveness().await?;
        Ok(member)
    }

    pub fn cluster_name(&self) -> &str {
        &self.config.cluster_name
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// How this node calls the others (TLS, token).
    pub fn peers(&self) -> &super::peer::PeerLink {
        &self.config.peers
    }

    /// Seconds a member may be down before its shares are rebuilt (0:
    /// never).
    pub fn rebuild_after_s(&self) -> u64 {
        self.config.rebuild_after_s
    }

    pub fn control_endpoint(&self) -> &str {
        self.control.endpoint()
    }

    /// The control plane.
    pub fn control(&self) -> Arc<dyn ControlPlane> {
        Arc::clone(&self.control)
    }

    /// The cluster's keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The cluster's datasets, with the node's cache of them.
    pub fn registry(&self) -> &super::registry::RegistryCache {
        &self.registry
    }

    /// The node's lease now (none while it has lost it).
    pub fn lease(&self) -> Option<LeaseId> {
        self.heartbeat.lock().expect("heartbeat poisoned").lease
    }

    /// The last control-plane failure the heartbeat saw, while it lasts.
    pub fn control_error(&self) -> Option<String> {
        self.heartbeat
            .lock()
            .expect("heartbeat poisoned")
            .control_error
            .clone()
    }

    /// How often the lease is renewed: a third of its time to live, so
    /// two renewals may be lost before it expires.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis((self.config.lease_ttl_s * 1000 / 3).max(200))
    }

    /// Records this node as a member with its pool, and adds it to the
    /// placement map (a new epoch), in one commit; a member already
    /// recorded with this pool is left as it is.
    async fn record_member(&self) -> Result<(), JoinError> {
        let node = &self.config.node_id;
        let member_key = self.keys.member(node);
        let placement_key = self.keys.placement();
        for _ in 0..COMMIT_ATTEMPTS_MAX {
            if let Some(entry) = self.control.get(&member_key).await? {
                let record: MemberRecord = decode(&entry)?;
                if record.pool_id == self.config.pool_id {
                    if record.state == MemberState::Drained && record.auto_drained {
                        // Drained by the repair while it was away: back in.
                        if !readmit(self.control.as_ref(), &self.keys, node).await? {
                            continue;
                        }
                    }
                    return Ok(());
                }
                let live_at = match self.control.get(&self.keys.live(node)).await? {
                    Some(e) => Some(decode::<LiveRecord>(&e)?.advertise),
                    None => None,
                };
                return Err(JoinError::NodeIdTaken {
                    cluster_name: self.config.cluster_name.clone(),
                    node_id: node.clone(),
                    holder_pool: record.pool_id,
                    live_at,
                    pool_id: self.config.pool_id.clone(),
                });
            }
            let (mut map, unchanged) =
                placement_for_update(self.control.as_ref(), &self.keys).await?;
            if !map.nodes.contains(node) {
                map.nodes.push(node.clone());
                map.epoch += 1;
            }
            let record = MemberRecord {
                format: RECORD_FORMAT,
                node_id: node.clone(),
                pool_id: self.config.pool_id.clone(),
                joined_unix_s: unix_now_s(),
                state: MemberState::Active,
                auto_drained: false,
            };
            let committed = self
                .control
                .commit(
                    vec![Condition::Absent(member_key.clone()), unchanged],
                    vec![
                        Write::Put {
                            key: member_key.clone(),
                            value: encode(&record),
                            lease: None,
                        },
                        Write::Put {
                            key: placement_key.clone(),
                            value: encode(&map),
                            lease: None,
                        },
                    ],
                )
                .await?;
            if committed {
                tracing::info!(
                    cluster = %self.config.cluster_name,
                    node = %node,
                    placement_epoch = map.epoch,
                    "joined the cluster as a new member"
                );
                return Ok(());
            }
        }
        Err(JoinError::Contended {
            cluster_name: self.config.cluster_name.clone(),
            what: "the member record and placement map",
            attempts: COMMIT_ATTEMPTS_MAX,
        })
    }

    fn live_record(&self, usage: (u64, u64)) -> LiveRecord {
        LiveRecord {
            format: RECORD_FORMAT,
            node_id: self.config.node_id.clone(),
            pool_id: self.config.pool_id.clone(),
            advertise: self.config.advertise.clone(),
            bulk_advertise: self.config.bulk_advertise.clone(),
            capacity_bytes: usage.0,
            used_bytes: usage.1,
            started_unix_s: self.started_unix_s,
            updated_unix_s: unix_now_s(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Takes the liveness key under a fresh lease. The key of this pool's
    /// previous run (killed before its lease expired) is taken over; one
    /// of another pool is refused.
    async fn take_liveness(&self) -> Result<(), JoinError> {
        let lease = self
            .control
            .grant_lease(i64::try_from(self.config.lease_ttl_s).unwrap_or(i64::MAX))
            .await?;
        let key = self.keys.live(&self.config.node_id);
        let usage = (self.usage)();
        let value = encode(&self.live_record(usage));
        let put = || Write::Put {
            key: key.clone(),
            value: value.clone(),
            lease: Some(lease),
        };
        let result = async {
            for _ in 0..COMMIT_ATTEMPTS_MAX {
                if self
                    .control
                    .commit(vec![Condition::Absent(key.clone())], vec![put()])
                    .await?
                {
                    return Ok(());
                }
                let Some(entry) = self.control.get(&key).await? else {
                    continue;
                };
                let held: LiveRecord = decode(&entry)?;
                if held.pool_id != self.config.pool_id {
                    return Err(JoinError::NodeIdTaken {
                        cluster_name: self.config.cluster_name.clone(),
                        node_id: self.config.node_id.clone(),
                        holder_pool: held.pool_id,
                        live_at: Some(held.advertise),
                        pool_id: self.config.pool_id.clone(),
                    });
                }
                // Our own previous run's key: take it over (its lease then
                // expires holding nothing).
                if self
                    .control
                    .commit(
                        vec![Condition::Unchanged {
                            key: key.clone(),
                            mod_revision: entry.mod_revision,
                        }],
                        vec![put()],
                    )
                    .await?
                {
                    if let Some(old) = entry.lease {
                        let _ = self.control.revoke(old).await;
                    }
                    return Ok(());
                }
            }
            Err(JoinError::Contended {
                cluster_name: self.config.cluster_name.clone(),
                what: "the node's liveness key",
                attempts: COMMIT_ATTEMPTS_MAX,
            })
        }
        .await;
        match result {
            Ok(()) => {
                let mut h = self.heartbeat.lock().expect("heartbeat poisoned");
                h.lease = Some(lease);
                h.published = usage;
                h.published_at = Instant::now();
                h.control_error = None;
                Ok(())
            }
            Err(e) => {
                let _ = self.control.revoke(lease).await;
                Err(e)
            }
        }
    }

    /// Keeps the lease alive until the task is dropped or aborted; spawn
    /// it once after [`join`](Self::join).
    pub async fn heartbeats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.heartbeat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.heartbeat().await;
        }
    }

    /// One renewal: keep the lease alive (or take a new one if it
    /// expired), then rewrite the liveness record if the pool's usage
    /// changed or it is due.
    async fn heartbeat(&self) {
        let lease = self.heartbeat.lock().expect("heartbeat poisoned").lease;
        let renewed = match lease {
            Some(l) => self.control.keep_alive(l).await.map(|ttl| ttl.is_some()),
            None => Ok(false),
        };
        let result = match renewed {
            Ok(true) => self.refresh(lease).await.map_err(JoinError::from),
            Ok(false) => {
                if lease.is_some() {
                    tracing::warn!(
                        node = %self.config.node_id,
                        "the node's lease expired (the control plane was out of reach for longer than its time to live): taking a new one"
                    );
                }
                self.heartbeat.lock().expect("heartbeat poisoned").lease = None;
                self.take_liveness().await
            }
            Err(e) => Err(e.into()),
        };
        let mut h = self.heartbeat.lock().expect("heartbeat poisoned");
        match result {
            Ok(()) => {
                if h.control_error.take().is_some() {
                    tracing::info!(node = %self.config.node_id, "the control plane answers again");
                }
            }
            Err(e) => {
                let text = e.to_string();
                if h.control_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(node = %self.config.node_id, error = %text, "cluster heartbeat failed; serving on");
                }
                h.control_error = Some(text);
            }
        }
    }

    /// Rewrites the liveness record when the usage changed or it is due.
    async fn refresh(&self, lease: Option<LeaseId>) -> Result<(), ControlError> {
        let usage = (self.usage)();
        {
            let h = self.heartbeat.lock().expect("heartbeat poisoned");
            if h.published == usage && h.published_at.elapsed() < REFRESH_INTERVAL {
                return Ok(());
            }
        }
        let key = self.keys.live(&self.config.node_id);
        // Only over our own key under our own lease: if it vanished (the
        // lease expired between the renewal and now) the next heartbeat
        // takes it again.
        let Some(entry) = self.control.get(&key).await? else {
            return Ok(());
        };
        if entry.lease != lease {
            return Ok(());
        }
        self.control
            .commit(
                vec![Condition::Unchanged {
                    key: key.clone(),
                    mod_revision: entry.mod_revision,
                }],
                vec![Write::Put {
                    key,
                    value: encode(&self.live_record(usage)),
                    lease,
                }],
            )
            .await?;
        let mut h = self.heartbeat.lock().expect("heartbeat poisoned");
        h.published = usage;
        h.published_at = Instant::now();
        Ok(())
    }

    /// Leaves cleanly: revokes the lease, so the node is seen down at
    /// once instead of after its time to live. It stays a member.
    pub async fn leave(&self) {
        let lease = self
            .heartbeat
            .lock()
            .expect("heartbeat poisoned")
            .lease
            .take();
        if let Some(l) = lease
            && let Err(e) = self.control.revoke(l).await
        {
            tracing::warn!(error = %e, "revoking the node's lease at shutdown (it expires by itself)");
        }
    }

    /// The cluster now: every member and live node, with lease times and
    /// the placement map, from one read of the cluster's keys.
    pub async fn view(&self) -> Result<ClusterView, ControlError> {
        view(self.control.as_ref(), &self.keys, &self.config.cluster_name).await
    }
}

/// The cluster's identity record; created by the first node to join.
async fn cluster_record(
    control: &dyn ControlPlane,
    keys: &Keys,
    config: &MemberConfig,
    binding: Option<&Binding>,
) -> Result<ClusterRecord, JoinError> {
    let key = keys.cluster();
    for _ in 0..COMMIT_ATTEMPTS_MAX {
        if let Some(entry) = control.get(&key).await? {
            return Ok(decode(&entry)?);
        }
        if let Some(b) = binding {
            // Making a new cluster of the old name would bind this node's
            // data to a cluster that never held it.
            return Err(JoinError::ClusterMissing {
                cluster_name: b.cluster_name.clone(),
                cluster_id: b.cluster_id.clone(),
            });
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| ControlError::Refused {
            endpoint: control.endpoint().to_owned(),
            operation: "making a cluster id",
            why: e.to_string(),
        })?;
        let record = ClusterRecord {
            format: RECORD_FORMAT,
            cluster_id: crate::device::pool_id_hex(&id),
            created_unix_s: unix_now_s(),
        };
        if control
            .commit(
                vec![Condition::Absent(key.clone())],
                vec![Write::Put {
                    key: key.clone(),
                    value: encode(&record),
                    lease: None,
                }],
            )
            .await?
        {
            tracing::info!(cluster = %config.cluster_name, id = %record.cluster_id, "created the cluster");
            return Ok(record);
        }
    }
    Err(JoinError::Contended {
        cluster_name: config.cluster_name.clone(),
        what: "the cluster record",
        attempts: COMMIT_ATTEMPTS_MAX,
    })
}

/// The placement map as it is (an empty one at epoch 0 when none was
/// written), with the condition a commit that rewrites it must hold.
pub(super) async fn placement_for_update(
    control: &dyn ControlPlane,
    keys: &Keys,
) -> Result<(Placement, Condition), ControlError> {
    let key = keys.placement();
    Ok(match control.get(&key).await? {
        Some(e) => (
            decode::<Placement>(&e)?,
            Condition::Unchanged {
                key,
                mod_revision: e.mod_revision,
            },
        ),
        None => (
            Placement {
                format: RECORD_FORMAT,
                ..Placement::default()
            },
            Condition::Absent(key),
        ),
    })
}

/// Takes `node`, drained (or being drained: the caller holds its repair
/// lock, so no drain runs) by the cluster's repair while it was down,
/// back into the placement map as an active member (a new epoch), in one
/// commit that also forgets when it went down. Shares already moved are
/// no longer its own (its sweep frees them); the rest it still holds. `false` when the records
/// changed meanwhile (read again and retry); `true` also when there was
/// nothing to do.
pub async fn readmit(
    control: &dyn ControlPlane,
    keys: &Keys,
    node: &str,
) -> Result<bool, ControlError> {
    let member_key = keys.member(node);
    let Some(entry) = control.get(&member_key).await? else {
        return Ok(true);
    };
    let mut record: MemberRecord = decode(&entry)?;
    if record.state == MemberState::Active || !record.auto_drained {
        return Ok(true);
    }
    let placement_key = keys.placement();
    let (mut map, unchanged) = placement_for_update(control, keys).await?;
    if !map.nodes.iter().any(|n| n == node) {
        map.nodes.push(node.to_owned());
    }
    map.epoch += 1;
    record.state = MemberState::Active;
    record.auto_drained = false;
    let committed = control
        .commit(
            vec![
                Condition::Unchanged {
                    key: member_key.clone(),
                    mod_revision: entry.mod_revision,
                },
                unchanged,
            ],
            vec![
                Write::Put {
                    key: member_key,
                    value: encode(&record),
                    lease: None,
                },
                Write::Put {
                    key: placement_key,
                    value: encode(&map),
                    lease: None,
                },
                Write::Delete {
                    key: keys.down(node),
                },
            ],
        )
        .await?;
    if committed {
        tracing::info!(
            node,
            placement_epoch = map.epoch,
            "back from a repair's drain: active and placed again"
        );
    }
    Ok(committed)
}

/// The cluster named `cluster_name` as its keys say now.
pub async fn view(
    control: &dyn ControlPlane,
    keys: &Keys,
    cluster_name: &str,
) -> Result<ClusterView, ControlError> {
    let entries = control.list(keys.root(), STATUS_KEYS_MAX).await?;
    let mut cluster_id = String::new();
    let mut placement = Placement::default();
    let mut nodes: std::collections::BTreeMap<String, NodeView> = Default::default();
    let mut live_leases: Vec<(String, LeaseId)> = Vec::new();
    for entry in &entries {
        let Some(rest) = entry.key.strip_prefix(keys.root()) else {
            continue;
        };
        if rest == "cluster" {
            cluster_id = decode::<ClusterRecord>(entry)?.cluster_id;
        } else if rest == "placement" {
            placement = decode(entry)?;
        } else if let Some(id) = rest.strip_prefix("members/") {
            let record: MemberRecord = decode(entry)?;
            view_of(&mut nodes, id).member = Some(record);
        } else if let Some(id) = rest.strip_prefix("down/") {
            let record: super::records::DownRecord = decode(entry)?;
            view_of(&mut nodes, id).down_since_unix_s = Some(record.since_unix_s);
        } else if let Some(id) = rest.strip_prefix("live/") {
            let record: LiveRecord = decode(entry)?;
            if let Some(l) = entry.lease {
                live_leases.push((id.to_owned(), l));
            }
            view_of(&mut nodes, id).live = Some(record);
        }
    }
    for (id, lease) in live_leases {
        let ttl = control.lease_ttl(lease).await?;
        view_of(&mut nodes, &id).lease_ttl_s = ttl;
        if ttl.is_none() {
            // Expired between the list and now.
            view_of(&mut nodes, &id).live = None;
        }
    }
    Ok(ClusterView {
        cluster_name: cluster_name.to_owned(),
        cluster_id,
        placement,
        nodes: nodes.into_values().collect(),
    })
}

fn view_of<'a>(
    nodes: &'a mut std::collections::BTreeMap<String, NodeView>,
    id: &str,
) -> &'a mut NodeView {
    nodes.entry(id.to_owned()).or_insert_with(|| NodeView {
        node_id: id.to_owned(),
        member: None,
        live: None,
        lease_ttl_s: None,
        down_since_unix_s: None,
    })
}
