//! The cluster's own repair: a member down for `cluster_rebuild_after_s`
//! has its shares rebuilt on other nodes, as `storagectl cluster drain`
//! would, so a second failure after the first does not find the cluster
//! still one node short of its redundancy. When it comes back it is taken
//! back in (active, placed, empty: its old shares are swept).
//!
//! Every node runs [`repair_forever`]. Each pass records when a member was
//! first seen down (`down/<node>`, written once, create-if-absent, so
//! every node agrees on the time) and forgets it once the member is up
//! again. Only the live active member with the smallest id acts on those
//! records, and it takes `repair/<node>` on its lease first, so two
//! passes never rebuild the same node (a repairer that dies drops the
//! lock with its lease; the next one resumes the drain, which is
//! resumable). A member that comes back while it is being drained is
//! readmitted when the drain ends.

use std::sync::Arc;
use std::time::Duration;

use super::control::{Condition, ControlError, Write};
use super::drain::{DrainError, drain_as};
use super::member::{ClusterView, Member, readmit};
use super::records::{DownRecord, MemberState, RECORD_FORMAT, RepairLock, encode, unix_now_s};

/// Why a repair pass stopped (the next pass tries again).
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("rebuilding {node:?}'s shares: {source}")]
    Drain {
        node: String,
        #[source]
        source: DrainError,
    },
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairPass {
    /// Members first seen down in this pass.
    pub seen_down: Vec<String>,
    /// Members whose shares this pass rebuilt elsewhere.
    pub rebuilt: Vec<String>,
    /// Members taken back in.
    pub readmitted: Vec<String>,
}

/// Runs [`repair_once`] every `interval` for as long as the node runs.
pub async fn repair_forever(member: Arc<Member>, rebuild_after: Duration, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match repair_once(&member, rebuild_after).await {
            Ok(pass) if pass != RepairPass::default() => {
                tracing::info!(?pass, "cluster repair pass");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cluster repair pass failed; trying again"),
        }
    }
}

/// One pass: see the module docs.
pub async fn repair_once(
    member: &Arc<Member>,
    rebuild_after: Duration,
) -> Result<RepairPass, RepairError> {
    let view = member.view().await?;
    let keys = member.keys();
    let control = member.control();
    let now = unix_now_s();
    let mut pass = RepairPass::default();
    for node in &view.nodes {
        let Some(record) = &node.member else { continue };
        let up = node.live.is_some();
        match (up, node.down_since_unix_s) {
            (false, None) if record.state == MemberState::Active => {
                let down = DownRecord {
                    format: RECORD_FORMAT,
                    node_id: node.node_id.clone(),
                    since_unix_s: now,
                };
                let key = keys.down(&node.node_id);
                let written = control
                    .commit(
                        vec![Condition::Absent(key.clone())],
                        vec![Write::Put {
                            key,
                            value: encode(&down),
                            lease: None,
                        }],
                    )
                    .await?;
                if written {
                    tracing::warn!(node = %node.node_id, "member down; its shares are rebuilt elsewhere if it stays down");
                    pass.seen_down.push(node.node_id.clone());
                }
            }
            (true, Some(_)) if !record.auto_drained => {
                control
                    .commit(
                        Vec::new(),
                        vec![Write::Delete {
                            key: keys.down(&node.node_id),
                        }],
                    )
                    .await?;
            }
            _ => {}
        }
    }
    if !is_repairer(&view, member.node_id()) {
        return Ok(pass);
    }
    for node in &view.nodes {
        let Some(record) = &node.member else { continue };
        let up = node.live.is_some();
        if up {
            // Back after the repair drained it (its join readmits it too),
            // or while a drain of it was cut off (no lock: none runs).
            let back = match record.state {
                MemberState::Drained => record.auto_drained,
                MemberState::Draining => {
                    record.auto_drained && lock(member, &node.node_id, now).await?
                }
                MemberState::Active => false,
            };
            let readmitted = back && readmit(control.as_ref(), keys, &node.node_id).await?;
            if record.state == MemberState::Draining && back {
                unlock(member, &node.node_id).await?;
            }
            if readmitted {
                pass.readmitted.push(node.node_id.clone());
            }
            continue;
        }
        let due = node
            .down_since_unix_s
            .is_some_and(|since| now.saturating_sub(since) >= rebuild_after.as_secs());
        let pending = record.state == MemberState::Active
            || (record.auto_drained && record.state == MemberState::Draining);
        if !due || !pending {
            continue;
        }
        if !lock(member, &node.node_id, now).await? {
            continue;
        }
        tracing::warn!(node = %node.node_id, down_s = now.saturating_sub(node.down_since_unix_s.unwrap_or(now)), "member down too long: rebuilding its shares on other nodes");
        let drained = drain_as(member, &node.node_id, true).await;
        let unlocked = unlock(member, &node.node_id).await;
        drained.map_err(|source| RepairError::Drain {
            node: node.node_id.clone(),
            source,
        })?;
        unlocked?;
        pass.rebuilt.push(node.node_id.clone());
    }
    Ok(pass)
}

/// Takes `repair/<node>` on this node's lease; `false` when another
/// holds it (or this node has no lease: the control plane is away).
async fn lock(member: &Member, node: &str, now: u64) -> Result<bool, ControlError> {
    let Some(lease) = member.lease() else {
        return Ok(false);
    };
    let lock = RepairLock {
        format: RECORD_FORMAT,
        node_id: node.to_owned(),
        repairer: member.node_id().to_owned(),
        started_unix_s: now,
    };
    let key = member.keys().repair(node);
    let locked = member
        .control()
        .commit(
            vec![Condition::Absent(key.clone())],
            vec![Write::Put {
                key,
                value: encode(&lock),
                lease: Some(lease),
            }],
        )
        .await?;
    Ok(locked)
}

/// Drops `repair/<node>`.
async fn unlock(member: &Member, node: &str) -> Result<(), ControlError> {
    member
        .control()
        .commit(
            Vec::new(),
            vec![Write::Delete {
                key: member.keys().repair(node),
            }],
        )
        .await?;
    Ok(())
}

/// Whether `me` is the member that acts: the live, active member with
/// the smallest id.
fn is_repairer(view: &ClusterView, me: &str) -> bool {
    view.nodes
        .iter()
        .filter(|n| n.live.is_some())
        .filter(|n| {
            n.member
                .as_ref()
                .is_some_and(|m| m.state == MemberState::Active)
        })
        .map(|n| n.node_id.as_str())
        .min()
        == Some(me)
}

#[cfg(test)]
mod tests {
    use super::super::member::NodeView;
    use super::super::records::{LiveRecord, MemberRecord, Placement};
    use super::*;

    fn node(id: &str, up: bool, state: MemberState) -> NodeView {
        NodeView {
            node_id: id.to_owned(),
            member: Some(MemberRecord {
                format: RECORD_FORMAT,
                node_id: id.to_owned(),
                pool_id: "p".into(),
                joined_unix_s: 0,
                state,
                auto_drained: false,
            }),
            live: up.then(|| LiveRecord {
                format: RECORD_FORMAT,
                node_id: id.to_owned(),
                pool_id: "p".into(),
                advertise: "127.0.0.1:1".into(),
                bulk_advertise: None,
                capacity_bytes: 0,
                used_bytes: 0,
                started_unix_s: 0,
                updated_unix_s: 0,
                version: String::new(),
            }),
            lease_ttl_s: None,
            down_since_unix_s: None,
        }
    }

    #[test]
    fn one_member_repairs_the_live_active_one_with_the_smallest_id() {
        // Guards against two nodes rebuilding the same member at once (or
        // none doing it): exactly one node answers true for a view.
        let view = ClusterView {
            cluster_name: "c".into(),
            cluster_id: "i".into(),
            placement: Placement::default(),
            nodes: vec![
                node("a", false, MemberState::Active),
                node("b", true, MemberState::Drained),
                node("c", true, MemberState::Active),
                node("d", true, MemberState::Active),
            ],
        };
        let repairers: Vec<&str> = ["a", "b", "c", "d"]
            .into_iter()
            .filter(|me| is_repairer(&view, me))
            .collect();
        assert_eq!(repairers, vec!["c"]);
    }
}
