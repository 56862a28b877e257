//! The cluster RPCs of the service: what the node's membership
//! (`crate::cluster`) knows, as wire messages.

use storaged_proto::pb;
use tonic::Status;

use super::codes::GrpcCode;
use crate::cluster::{ClusterView, Member};

/// FAILED_PRECONDITION for a cluster RPC on a node without `--cluster`.
pub(super) fn not_clustered() -> Status {
    Status::failed_precondition(
        "this storaged is not in a cluster (it was started without --cluster etcd://...)",
    )
}

/// `ClusterStatus`: the cluster as the control plane says now.
pub(super) async fn cluster_status(member: &Member) -> Result<pb::ClusterStatusResponse, Status> {
    let view = member.view().await.map_err(|e| e.to_status())?;
    Ok(response(member, view))
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
    }
}
