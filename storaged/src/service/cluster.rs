//! The cluster RPCs of the service: what the node's membership
//! (`crate::cluster`) knows, as wire messages.

use std::sync::Arc;
use std::time::Duration;

use storaged_proto::model::StorageClass;
use storaged_proto::pb::{self, ingest_request};
use storaged_proto::{DatasetName, ObjectPath};
use tonic::{Status, Streaming};

use super::codes::GrpcCode;
use crate::cluster::ingest::ClusterIngest;
use crate::cluster::records::DatasetRecord;
use crate::cluster::registry::DatasetPlacement;
use crate::cluster::{ClusterView, Member};
use crate::store::Store;

/// FAILED_PRECONDITION for a cluster RPC on a node without `--cluster`.
pub(super) fn not_clustered() -> Status {
    Status::failed_precondition(
        "this storaged is not in a cluster (it was started without --cluster etcd://...)",
    )
}

/// `ClusterStatus`: the cluster as the control plane says now.
/// `ClusterStatus`: the nodes, the placement map, and the datasets with
/// a node down that `may_read` lets the caller see.
pub(super) async fn cluster_status(
    member: &Member,
    may_read: impl Fn(&str) -> bool,
) -> Result<pb::ClusterStatusResponse, Status> {
    let view = member.view().await.map_err(|e| e.to_status())?;
    let (records, _) = member
        .registry()
        .list(member)
        .await
        .map_err(|e| e.to_status())?;
    let at_risk = records
        .iter()
        .filter(|r| may_read(&r.name))
        .filter_map(|r| {
            let down = nodes_down(r, &view);
            (!down.is_empty()).then(|| pb::DatasetAtRisk {
                name: r.name.clone(),
                ec_data_units: r.k,
                ec_parity_units: r.m,
                readable: down.len() as u32 <= r.m,
                nodes_down: down.into_iter().map(str::to_owned).collect(),
            })
        })
        .collect();
    Ok(pb::ClusterStatusResponse {
        at_risk,
        rebuild_after_s: member.rebuild_after_s(),
        ..response(member, view)
    })
}

fn response(member: &Member, view: ClusterView) -> pb::ClusterStatusResponse {
    let placed = |id: &str| view.placement.nodes.iter().any(|n| n == id);
    let nodes = view
        .nodes
        .iter()
        .map(|n| {
            let state = match (&n.member, &n.live) {
                (Some(_), Some(_)) => "up",
                (Some(_), None) => "down",
                (None, _) => "joining",
            };
            let live = n.live.as_ref();
            pb::ClusterNode {
                node_id: n.node_id.clone(),
                state: state.to_owned(),
                advertise: live.map(|l| l.advertise.clone()).unwrap_or_default(),
                bulk_advertise: live
                    .and_then(|l| l.bulk_advertise.clone())
                    .unwrap_or_default(),
                lease_ttl_s: n.lease_ttl_s.unwrap_or(0),
                capacity_bytes: live.map_or(0, |l| l.capacity_bytes),
                used_bytes: live.map_or(0, |l| l.used_bytes),
                pool_id: n
                    .member
                    .as_ref()
                    .map(|m| m.pool_id.clone())
                    .or_else(|| live.map(|l| l.pool_id.clone()))
                    .unwrap_or_default(),
                joined_unix_s: n.member.as_ref().map_or(0, |m| m.joined_unix_s),
                started_unix_s: live.map_or(0, |l| l.started_unix_s),
                updated_unix_s: live.map_or(0, |l| l.updated_unix_s),
                placed: placed(&n.node_id),
                version: live.map(|l| l.version.clone()).unwrap_or_default(),
                member_state: n
                    .member
                    .as_ref()
                    .map(|m| m.state.name().to_owned())
                    .unwrap_or_default(),
                down_since_unix_s: n.down_since_unix_s.unwrap_or(0),
            }
        })
        .collect();
    pb::ClusterStatusResponse {
        cluster_name: view.cluster_name,
        cluster_id: view.cluster_id,
        this_node: member.node_id().to_owned(),
        control_plane: member.control_endpoint().to_owned(),
        placement_epoch: view.placement.epoch,
        placement_nodes: view.placement.nodes,
        nodes,
        at_risk: Vec::new(),
        rebuild_after_s: 0,
    }
}

/// A cluster ingest coordinated by this node: the client's stream cut
/// into shards for the dataset's nodes, then one commit.
pub(super) async fn ingest(
    member: &Arc<Member>,
    name: &DatasetName,
    asked: Option<StorageClass>,
    mut stream: Streaming<pb::IngestRequest>,
    idle: Duration,
) -> Result<pb::IngestResponse, Status> {
    let class = match asked {
        None => None,
        Some(StorageClass::Ec {
            data_units,
            parity_units,
        }) => Some((u32::from(data_units), u32::from(parity_units))),
        Some(StorageClass::Stripe) => {
            return Err(Status::invalid_argument(
                "cluster datasets are erasure-coded across nodes: use ec:K+M, not stripe",
            ));
        }
    };
    let mut ingest = ClusterIngest::begin(Arc::clone(member), name.as_str(), class)
        .await
        .map_err(|e| e.to_status())?;
    tracing::info!(dataset = %name, class = ?ingest.class(), "cluster ingest started");
    loop {
        let Ok(next) = tokio::time::timeout(idle, stream.message()).await else {
            return Err(Status::deadline_exceeded(format!(
                "the ingest sent nothing for {} s (ingest_idle_timeout_s); it was discarded",
                idle.as_secs()
            )));
        };
        let msg = match next? {
            Some(m) => m,
            None => {
                return Err(Status::invalid_argument(
                    "ingest stream ended without `commit`; nothing was stored",
                ));
            }
        };
        let step = match msg.msg {
            Some(ingest_request::Msg::Object(o)) => {
                let path =
                    ObjectPath::new(o.path).map_err(|e| Status::invalid_argument(e.to_string()))?;
                ingest.begin_object(path.as_str(), o.size, o.crc32).await
            }
            Some(ingest_request::Msg::Data(d)) => ingest.data(&d).await,
            Some(ingest_request::Msg::Commit(c)) => {
                let record = ingest
                    .commit(c.object_count, c.total_bytes)
                    .await
                    .map_err(|e| e.to_status())?;
                return Ok(pb::IngestResponse {
                    dataset: Some(info(&record, "")),
                });
            }
            Some(ingest_request::Msg::Begin(_)) => {
                return Err(Status::invalid_argument("`begin` sent twice in one ingest"));
            }
            None => return Err(Status::invalid_argument("empty ingest message")),
        };
        step.map_err(|e| e.to_status())?;
    }
}

/// A cluster dataset as ListDatasets shows it.
fn info(r: &DatasetRecord, health: &str) -> pb::DatasetInfo {
    pb::DatasetInfo {
        name: r.name.clone(),
        object_count: r.object_count,
        total_bytes: r.total_bytes,
        storage_class: pb::StorageClass::Ec as i32,
        created_unix_ms: i64::try_from(r.created_unix_s.saturating_mul(1000)).unwrap_or(i64::MAX),
        allocated_bytes: 0,
        ec_data_units: r.k,
        ec_parity_units: r.m,
        reconstructions: 0,
        health: health.to_owned(),
        dataset_id: 0,
        cluster_unit: r.unit.clone(),
    }
}

/// The cluster's datasets, each with its health: how many of its nodes
/// are down against the M it tolerates.
pub(super) async fn list(member: &Member) -> Result<Vec<pb::DatasetInfo>, Status> {
    let (records, from_cache) = member
        .registry()
        .list(member)
        .await
        .map_err(|e| e.to_status())?;
    let view = if from_cache {
        None
    } else {
        member.view().await.ok()
    };
    Ok(records
        .iter()
        .map(|r| {
            let health = view.as_ref().map_or_else(
                || {
                    "unknown: the control plane is out of reach (listed from this node's last copy)"
                        .to_owned()
                },
                |v| health(r, v),
            );
            info(r, &health)
        })
        .collect())
}

/// Empty when every node of the dataset is up; else which are down and
/// whether the data is still readable.
fn health(r: &DatasetRecord, view: &ClusterView) -> String {
    let down = nodes_down(r, view);
    if down.is_empty() {
        String::new()
    } else if down.len() as u32 <= r.m {
        format!(
            "degraded: node(s) {} down; readable from parity ({} more may fail)",
            down.join(", "),
            r.m - down.len() as u32
        )
    } else {
        format!(
            "unreadable: node(s) {} down, more than the {} its class tolerates",
            down.join(", "),
            r.m
        )
    }
}

/// The nodes of `r` that are down.
fn nodes_down<'a>(r: &'a DatasetRecord, view: &ClusterView) -> Vec<&'a str> {
    r.nodes
        .iter()
        .filter(|id| {
            !view
                .nodes
                .iter()
                .any(|n| &n.node_id == *id && n.live.is_some())
        })
        .map(String::as_str)
        .collect()
}

/// `rm` of a cluster dataset: its record deleted (the commit point), then
/// this node's unit swept at once (the others sweep on their timers).
pub(super) async fn remove(
    member: &Member,
    store: &Arc<Store>,
    name: &DatasetName,
) -> Result<u64, Status> {
    let record = member
        .registry()
        .remove(member, name.as_str())
        .await
        .map_err(|e| e.to_status())?;
    let _ = crate::cluster::registry::sweep_orphans(member, store).await;
    Ok(record.total_bytes)
}

/// `GetClusterDataset`.
pub(super) async fn dataset(
    member: &Member,
    name: &DatasetName,
) -> Result<pb::ClusterDataset, Status> {
    let DatasetPlacement {
        record: r,
        addresses,
        from_cache,
    } = member
        .registry()
        .dataset(member, name.as_str())
        .await
        .map_err(|e| e.to_status())?;
    Ok(pb::ClusterDataset {
        name: r.name.clone(),
        ec_data_units: r.k,
        ec_parity_units: r.m,
        chunk_bytes: r.chunk_bytes,
        unit_dataset: r.unit.clone(),
        nodes: r
            .nodes
            .iter()
            .zip(addresses)
            .map(|(id, a)| pb::ClusterDatasetNode {
                node_id: id.clone(),
                advertise: a.unwrap_or_default(),
            })
            .collect(),
        placement_epoch: r.placement_epoch,
        object_count: r.object_count,
        total_bytes: r.total_bytes,
        created_unix_s: r.created_unix_s,
        from_cache,
    })
}

/// `DrainNode`.
pub(super) async fn drain(
    member: &Arc<Member>,
    node: &str,
) -> Result<pb::DrainNodeResponse, Status> {
    let report = crate::cluster::drain::drain(member, node)
        .await
        .map_err(|e| e.to_status())?;
    Ok(pb::DrainNodeResponse {
        datasets_moved: report.datasets_moved,
        bytes_moved: report.bytes_moved,
        placement_epoch: report.placement_epoch,
    })
}
