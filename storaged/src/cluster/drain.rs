//! `storagectl cluster drain NODE`: a node leaves the cluster without a
//! moment of reduced redundancy. It is taken out of the placement map
//! first (a new epoch: no new data goes to it), then each dataset it holds
//! a share of gets that share copied, object by object, to a node that
//! holds none of the dataset (its unit dataset is self-contained: the
//! node's pieces and the manifest), and the dataset's record swaps the
//! node for the new one at the same place in its layout, in one
//! conditional commit. Until that commit reads use the draining node, so
//! they go on throughout; after it the draining node's sweep frees the
//! old share. When nothing is left the node is "drained" and may stop.
//!
//! The copy is a local ingest on the new node under an intent on the
//! coordinator's lease (so the new node's sweep keeps it while it is
//! under way, and deletes it if the coordinator dies). Draining again
//! carries on where it stopped. The draining node must be up: moving the
//! shares of a dead node means rebuilding them from parity (not built
//! yet).

use std::sync::Arc;

use futures::StreamExt;
use storaged_proto::pb;
use storaged_proto::pb::ingest_request::Msg;

use super::control::{Condition, ControlError, Write};
use super::ingest::{ClusterIngestError, node_client, open_unit};
use super::member::Member;
use super::records::{
    DatasetRecord, IngestIntent, MemberRecord, MemberState, Placement, RECORD_FORMAT, decode,
    encode, unix_now_s,
};

/// Objects listed per page while copying a share.
const LIST_PAGE_OBJECTS: u32 = 1000;

/// Why a drain stopped. What it moved stays moved; run it again to go on.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Copy(#[from] ClusterIngestError),
    #[error("no node {0:?} in the cluster")]
    NoSuchNode(String),
    #[error(
        "node {node:?} is down: draining copies its shares from it (rebuilding a dead node's shares from parity is not built yet)"
    )]
    NodeDown { node: String },
    #[error(
        "dataset {dataset:?}: no node up and placed holds none of it, so its share on {node:?} has nowhere to go (add a node)"
    )]
    NowhereToGo { dataset: String, node: String },
    #[error("reading {node:?}'s share of {dataset:?}: {why}")]
    Read {
        node: String,
        dataset: String,
        why: String,
    },
    #[error("{what} kept changing under the drain; run it again")]
    Contended { what: String },
}

/// What a drain did.
#[derive(Debug, Clone, Default)]
pub struct DrainReport {
    pub datasets_moved: u32,
    pub bytes_moved: u64,
    pub placement_epoch: u64,
}

/// Drains `node`: see the module docs.
pub async fn drain(member: &Arc<Member>, node: &str) -> Result<DrainReport, DrainError> {
    let keys = member.keys().clone();
    let control = member.control();
    let placement_epoch = leave_placement(member, node).await?;
    let mut report = DrainReport {
        placement_epoch,
        ..Default::default()
    };
    let entries = control
        .list(&keys.datasets(), super::member::STATUS_KEYS_MAX)
        .await?;
    for entry in entries {
        let record: DatasetRecord = decode(&entry)?;
        let Some(at) = record.nodes.iter().position(|n| n == node) else {
            continue;
        };
        let view = member.view().await?;
        let address_of = |id: &str| {
            view.nodes
                .iter()
                .find(|n| n.node_id == id)
                .and_then(|n| n.live.as_ref().map(|l| l.advertise.clone()))
        };
        let from = address_of(node).ok_or_else(|| DrainError::NodeDown {
            node: node.to_owned(),
        })?;
        let to = view
            .placement
            .nodes
            .iter()
            .filter(|id| !record.nodes.contains(id))
            .find_map(|id| address_of(id).map(|a| (id.clone(), a)))
            .ok_or_else(|| DrainError::NowhereToGo {
                dataset: record.name.clone(),
                node: node.to_owned(),
            })?;
        let bytes = move_share(member, &record, entry.mod_revision, at, &from, to).await?;
        report.datasets_moved += 1;
        report.bytes_moved += bytes;
    }
    set_state(member, node, MemberState::Drained).await?;
    tracing::info!(
        node,
        datasets = report.datasets_moved,
        bytes = report.bytes_moved,
        "node drained"
    );
    Ok(report)
}

/// Marks `node` draining and takes it out of the placement map (a new
/// epoch), in one commit; answers the epoch.
async fn leave_placement(member: &Member, node: &str) -> Result<u64, DrainError> {
    let keys = member.keys();
    let control = member.control();
    for _ in 0..16 {
        let (m, mut record) = member_record(member, node).await?;
        let p = control.get(&keys.placement()).await?;
        let (mut placement, condition) = match &p {
            Some(e) => (
                decode::<Placement>(e)?,
                Condition::Unchanged {
                    key: keys.placement(),
                    mod_revision: e.mod_revision,
                },
            ),
            None => (
                Placement {
                    format: RECORD_FORMAT,
                    ..Default::default()
                },
                Condition::Absent(keys.placement()),
            ),
        };
        if record.state != MemberState::Active && !placement.nodes.iter().any(|n| n == node) {
            return Ok(placement.epoch);
        }
        placement.nodes.retain(|n| n != node);
        placement.epoch += 1;
        if record.state == MemberState::Active {
            record.state = MemberState::Draining;
        }
        if control
            .commit(
                vec![
                    Condition::Unchanged {
                        key: keys.member(node),
                        mod_revision: m.mod_revision,
                    },
                    condition,
                ],
                vec![
                    Write::Put {
                        key: keys.member(node),
                        value: encode(&record),
                        lease: None,
                    },
                    Write::Put {
                        key: keys.placement(),
                        value: encode(&placement),
                        lease: None,
                    },
                ],
            )
            .await?
        {
            tracing::info!(
                node,
                placement_epoch = placement.epoch,
                "draining: out of the placement map"
            );
            return Ok(placement.epoch);
        }
    }
    Err(DrainError::Contended {
        what: "the member record and placement map".to_owned(),
    })
}

/// `node`'s member record, with the entry it was read from.
async fn member_record(
    member: &Member,
    node: &str,
) -> Result<(super::control::Entry, MemberRecord), DrainError> {
    let entry = member
        .control()
        .get(&member.keys().member(node))
        .await?
        .ok_or_else(|| DrainError::NoSuchNode(node.to_owned()))?;
    let record = decode(&entry)?;
    Ok((entry, record))
}

/// Sets `node`'s member state.
async fn set_state(member: &Member, node: &str, state: MemberState) -> Result<(), DrainError> {
    let keys = member.keys();
    let control = member.control();
    for _ in 0..16 {
        let (m, mut record) = member_record(member, node).await?;
        record.state = state;
        if control
            .commit(
                vec![Condition::Unchanged {
                    key: keys.member(node),
                    mod_revision: m.mod_revision,
                }],
                vec![Write::Put {
                    key: keys.member(node),
                    value: encode(&record),
                    lease: None,
                }],
            )
            .await?
        {
            return Ok(());
        }
    }
    Err(DrainError::Contended {
        what: format!("node {node}'s member record"),
    })
}

/// Copies the share at layout position `at` of `record` (on the node at
/// `from`) to node `to`, then swaps the nodes in the record. Answers the
/// bytes copied.
async fn move_share(
    member: &Member,
    record: &DatasetRecord,
    record_revision: i64,
    at: usize,
    from: &str,
    (to_node, to_address): (String, String),
) -> Result<u64, DrainError> {
    let keys = member.keys();
    let control = member.control();
    let old_node = record.nodes[at].clone();
    let read_failed = |why: String| DrainError::Read {
        node: old_node.clone(),
        dataset: record.name.clone(),
        why,
    };
    // The intent keeps the new share from the new node's sweep while it
    // is copied, and lets the sweep take it if this coordinator dies.
    let intent_key = keys.ingest(&format!("{}.to-{to_node}", record.unit));
    let intent = IngestIntent {
        format: RECORD_FORMAT,
        dataset: record.name.clone(),
        unit: record.unit.clone(),
        nodes: vec![to_node.clone()],
        coordinator: member.node_id().to_owned(),
        started_unix_s: unix_now_s(),
    };
    let lease = member.lease().ok_or_else(|| ControlError::Unreachable {
        endpoint: control.endpoint().to_owned(),
        why: "this node holds no lease (its last heartbeat failed)".to_owned(),
    })?;
    control
        .commit(
            Vec::new(),
            vec![Write::Put {
                key: intent_key.clone(),
                value: encode(&intent),
                lease: Some(lease),
            }],
        )
        .await?;
    let result = async {
        let mut source = node_client(from).await.map_err(&read_failed)?;
        let mut target = open_unit(to_node.clone(), to_address, &record.unit).await?;
        let (mut objects, mut bytes, mut token) = (0u64, 0u64, String::new());
        loop {
            let page = source
                .list_objects(pb::ListObjectsRequest {
                    dataset: record.unit.clone(),
                    prefix: String::new(),
                    page_size: LIST_PAGE_OBJECTS,
                    page_token: token.clone(),
                })
                .await
                .map_err(|s| read_failed(s.message().to_owned()))?
                .into_inner();
            for o in page.objects {
                target
                    .send(Msg::Object(pb::ObjectBegin {
                        path: o.path.clone(),
                        size: o.size,
                        crc32: Some(o.crc32),
                    }))
                    .await?;
                let mut stream = source
                    .read(pb::ReadRequest {
                        dataset: record.unit.clone(),
                        path: o.path.clone(),
                        offset: 0,
                        length: None,
                        dataset_id: None,
                    })
                    .await
                    .map_err(|s| read_failed(s.message().to_owned()))?
                    .into_inner();
                let mut got = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|s| read_failed(s.message().to_owned()))?;
                    got += chunk.data.len() as u64;
                    target.send(Msg::Data(chunk.data)).await?;
                }
                if got != o.size {
                    return Err(read_failed(format!(
                        "{}: {got} bytes of {}",
                        o.path, o.size
                    )));
                }
                objects += 1;
                bytes += o.size;
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        target
            .send(Msg::Commit(pb::IngestCommit {
                object_count: objects,
                total_bytes: bytes,
            }))
            .await?;
        target.finish().await?;
        let mut moved = record.clone();
        moved.nodes[at] = to_node.clone();
        let committed = control
            .commit(
                vec![Condition::Unchanged {
                    key: keys.dataset(&record.name),
                    mod_revision: record_revision,
                }],
                vec![
                    Write::Put {
                        key: keys.dataset(&record.name),
                        value: encode(&moved),
                        lease: None,
                    },
                    Write::Delete {
                        key: intent_key.clone(),
                    },
                ],
            )
            .await?;
        if !committed {
            return Err(DrainError::Contended {
                what: format!("dataset {:?}'s record", record.name),
            });
        }
        tracing::info!(dataset = %record.name, from = %old_node, to = %to_node, bytes, "share moved");
        Ok(bytes)
    }
    .await;
    if result.is_err() {
        let _ = control
            .commit(Vec::new(), vec![Write::Delete { key: intent_key }])
            .await;
    }
    result
}
