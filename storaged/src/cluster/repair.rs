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
//!
//! With every member up and no drain under way, the same node also evens
//! out the data (config
//! `cluster_rebalance`): each pass moves at most one share, from the
//! placed node holding the most bytes to the one holding the least, when
//! that narrows the gap without reversing it, so a node that joins fills
//! up over time while reads go on (the drain's copy: the share is copied
//! under an intent, then the dataset's record swaps the nodes).

use std::sync::Arc;
use std::time::Duration;

use super::control::{Condition, ControlError, Write};
use super::drain::{DrainError, ShareSource, drain_as, move_share};
use super::member::{ClusterView, Member, STATUS_KEYS_MAX, readmit};
use super::records::{
    DatasetRecord, DownRecord, MemberState, RECORD_FORMAT, RepairLock, decode, encode, unix_now_s,
};

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
    /// A share moved to even out the nodes: (dataset, from, to, bytes).
    pub rebalanced: Option<(String, String, String, u64)>,
}

/// What the repair does besides rebuilding: see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct RepairOptions {
    /// A member down this long is rebuilt elsewhere; zero: never.
    pub rebuild_after: Duration,
    pub rebalance: bool,
}

/// Runs [`repair_once`] every `interval` for as long as the node runs.
pub async fn repair_forever(member: Arc<Member>, options: RepairOptions, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match repair_once(&member, options).await {
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
    options: RepairOptions,
) -> Result<RepairPass, RepairError> {
    let rebuild_after = options.rebuild_after;
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
        if rebuild_after.is_zero() || !due || !pending {
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
    // Not while anything else moves shares: a member down (its rebuild
    // comes first) or a drain under way (both would swap the same
    // records, and the drain would stop on the conflict).
    let settled = view.nodes.iter().all(|n| match &n.member {
        None => true,
        Some(m) => match m.state {
            MemberState::Active => n.live.is_some(),
            MemberState::Draining => false,
            MemberState::Drained => true,
        },
    });
    if options.rebalance && settled && pass.rebuilt.is_empty() {
        pass.rebalanced = rebalance_once(member, &view).await?;
    }
    Ok(pass)
}

/// Moves one share from the placed node holding the most bytes to the one
/// holding the least, if that narrows the gap without reversing it (the
/// largest such share); see the module docs.
async fn rebalance_once(
    member: &Arc<Member>,
    view: &ClusterView,
) -> Result<Option<(String, String, String, u64)>, RepairError> {
    let address: std::collections::BTreeMap<&str, &str> = view
        .nodes
        .iter()
        .filter(|n| view.placement.nodes.contains(&n.node_id))
        .filter(|n| {
            n.member
                .as_ref()
                .is_some_and(|m| m.state == MemberState::Active)
        })
        .filter_map(|n| Some((n.node_id.as_str(), n.live.as_ref()?.advertise.as_str())))
        .collect();
    if address.len() < 2 {
        return Ok(None);
    }
    let entries = member
        .control()
        .list(&member.keys().datasets(), STATUS_KEYS_MAX)
        .await?;
    let records = entries
        .iter()
        .map(|e| Ok((decode::<DatasetRecord>(e)?, e.mod_revision)))
        .collect::<Result<Vec<_>, ControlError>>()?;
    let share = |r: &DatasetRecord| r.total_bytes.div_ceil(u64::from(r.k.max(1)));
    let mut load: std::collections::BTreeMap<&str, u64> = address.keys().map(|&n| (n, 0)).collect();
    for (r, _) in &records {
        for n in &r.nodes {
            if let Some(l) = load.get_mut(n.as_str()) {
                *l += share(r);
            }
        }
    }
    let (&from, &most) = load.iter().max_by_key(|(_, l)| **l).expect("two nodes");
    let (&to, &least) = load.iter().min_by_key(|(_, l)| **l).expect("two nodes");
    let gap = most - least;
    let Some((record, revision)) = records
        .iter()
        .filter(|(r, _)| r.nodes.iter().any(|n| n == from) && !r.nodes.iter().any(|n| n == to))
        .filter(|(r, _)| share(r) > 0 && 2 * share(r) <= gap)
        .max_by_key(|(r, _)| share(r))
    else {
        return Ok(None);
    };
    let at = record
        .nodes
        .iter()
        .position(|n| n == from)
        .expect("filtered");
    tracing::info!(dataset = %record.name, from, to, gap, "rebalancing: moving a share");
    let source = ShareSource::Copy {
        address: address[from].to_owned(),
    };
    let bytes = move_share(
        member,
        record,
        *revision,
        at,
        source,
        (to.to_owned(), address[to].to_owned()),
    )
    .await
    .map_err(|source| RepairError::Drain {
        node: from.to_owned(),
        source,
    })?;
    Ok(Some((
        record.name.clone(),
        from.to_owned(),
        to.to_owned(),
        bytes,
    )))
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
