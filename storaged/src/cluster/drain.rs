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
//! carries on where it stopped. A node that is down cannot give its
//! shares: they are rebuilt instead, stripe by stripe, from K of the
//! dataset's other nodes (its chunk recomputed by Reed-Solomon), which
//! restores the dataset's redundancy after a node is lost for good.

use std::sync::Arc;

use futures::StreamExt;
use storaged_proto::pb;
use storaged_proto::pb::ingest_request::Msg;

use super::control::{Condition, ControlError, Write};
use reed_solomon_erasure::galois_8::ReedSolomon;
use storaged_proto::cluster::{EcLayout, MANIFEST_PATH, decode_manifest};

use super::ingest::{ClusterIngestError, UnitStream, open_unit};
use super::member::Member;
use super::peer::{PeerClient, PeerLink, node_client};
use super::records::{
    DatasetRecord, IngestIntent, MemberRecord, MemberState, RECORD_FORMAT, decode, encode,
    unix_now_s,
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
    #[error("dataset {dataset:?}: only {up} of its nodes are up, and rebuilding a share needs {k}")]
    TooFewSurvivors { dataset: String, up: usize, k: u32 },
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
    drain_as(member, node, false).await
}

/// [`drain`], recording whether the cluster's own repair asked for it
/// (`auto`: the node is taken back in when it returns) or an operator.
pub async fn drain_as(
    member: &Arc<Member>,
    node: &str,
    auto: bool,
) -> Result<DrainReport, DrainError> {
    let keys = member.keys().clone();
    let control = member.control();
    let placement_epoch = leave_placement(member, node, auto).await?;
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
        let source = match address_of(node) {
            Some(address) => ShareSource::Copy { address },
            None => ShareSource::Rebuild {
                survivors: record
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != at)
                    .filter_map(|(i, id)| address_of(id).map(|a| (i, a)))
                    .collect(),
            },
        };
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
        let bytes = move_share(member, &record, entry.mod_revision, at, source, to).await?;
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
async fn leave_placement(member: &Member, node: &str, auto: bool) -> Result<u64, DrainError> {
    let keys = member.keys();
    let control = member.control();
    for _ in 0..16 {
        let (m, mut record) = member_record(member, node).await?;
        let (mut placement, condition) =
            super::member::placement_for_update(control.as_ref(), keys).await?;
        if record.state != MemberState::Active && !placement.nodes.iter().any(|n| n == node) {
            return Ok(placement.epoch);
        }
        placement.nodes.retain(|n| n != node);
        placement.epoch += 1;
        if record.state == MemberState::Active {
            record.state = MemberState::Draining;
            record.auto_drained = auto;
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

/// Where a moved share comes from.
pub(super) enum ShareSource {
    /// The node is up: its unit is copied object by object.
    Copy { address: String },
    /// The node is down: its pieces are rebuilt from the other nodes
    /// (layout position, address), stripe by stripe.
    Rebuild { survivors: Vec<(usize, String)> },
}

/// Moves the share at layout position `at` of `record` to node `to`
/// (copied or rebuilt, see [`ShareSource`]), then swaps the nodes in the
/// record. Answers the bytes written.
pub(super) async fn move_share(
    member: &Member,
    record: &DatasetRecord,
    record_revision: i64,
    at: usize,
    source: ShareSource,
    (to_node, to_address): (String, String),
) -> Result<u64, DrainError> {
    let keys = member.keys();
    let control = member.control();
    let old_node = record.nodes[at].clone();
    // The intent keeps the new share from the new node's sweep while it
    // is written, and lets the sweep take it if this coordinator dies.
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
        let link = member.peers();
        let mut target = open_unit(link, to_node.clone(), to_address, &record.unit).await?;
        let (objects, bytes) = match source {
            ShareSource::Copy { address } => {
                copy_share(link, record, &address, &mut target).await?
            }
            ShareSource::Rebuild { survivors } => {
                rebuild_share(link, record, at, &survivors, &mut target).await?
            }
        };
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

/// A failed read of `node`'s unit of `record`.
fn read_failed(record: &DatasetRecord, node: &str, why: String) -> DrainError {
    DrainError::Read {
        node: node.to_owned(),
        dataset: record.name.clone(),
        why,
    }
}

/// Bytes `[offset, offset + length)` (to the end without a length) of
/// `path` in `record`'s unit on a node, whole.
async fn read_object(
    node: &mut PeerClient,
    record: &DatasetRecord,
    path: &str,
    offset: u64,
    length: Option<u64>,
) -> Result<Vec<u8>, String> {
    let mut stream = node
        .read(pb::ReadRequest {
            dataset: record.unit.clone(),
            path: path.to_owned(),
            offset,
            length,
            dataset_id: None,
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.map_err(|s| s.message().to_owned())?.data);
    }
    Ok(out)
}

/// Copies every object of the unit on the node at `address` (its pieces
/// and the manifest) into `target`; answers (objects, bytes).
async fn copy_share(
    link: &PeerLink,
    record: &DatasetRecord,
    address: &str,
    target: &mut UnitStream,
) -> Result<(u64, u64), DrainError> {
    let failed = |why: String| read_failed(record, address, why);
    let mut source = node_client(link, address).await.map_err(failed)?;
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
            .map_err(|s| failed(s.message().to_owned()))?
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
                .map_err(|s| failed(s.message().to_owned()))?
                .into_inner();
            let mut got = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|s| failed(s.message().to_owned()))?;
                got += chunk.data.len() as u64;
                target.send(Msg::Data(chunk.data)).await?;
            }
            if got != o.size {
                return Err(failed(format!("{}: {got} bytes of {}", o.path, o.size)));
            }
            objects += 1;
            bytes += o.size;
        }
        if page.next_page_token.is_empty() {
            return Ok((objects, bytes));
        }
        token = page.next_page_token;
    }
}

/// Rebuilds the pieces of layout position `at` from `survivors` into
/// `target`: for every object of the manifest and every stripe, K chunks
/// read (ranged) from surviving nodes, the missing chunk recomputed by
/// Reed-Solomon; then the manifest copied. Answers (objects, bytes).
async fn rebuild_share(
    link: &PeerLink,
    record: &DatasetRecord,
    at: usize,
    survivors: &[(usize, String)],
    target: &mut UnitStream,
) -> Result<(u64, u64), DrainError> {
    let layout = EcLayout {
        k: record.k,
        m: record.m,
        chunk_bytes: record.chunk_bytes,
    };
    let (k, width) = (record.k as usize, layout.width() as usize);
    if survivors.len() < k {
        return Err(DrainError::TooFewSurvivors {
            dataset: record.name.clone(),
            up: survivors.len(),
            k: record.k,
        });
    }
    let codec = ReedSolomon::new(k, record.m as usize)
        .map_err(|e| read_failed(record, &record.nodes[at], format!("{e:?}")))?;
    let mut clients = Vec::new();
    for (position, address) in survivors.iter().take(k) {
        let c = node_client(link, address)
            .await
            .map_err(|why| read_failed(record, address, why))?;
        clients.push((*position, address.clone(), c));
    }
    // The manifest, from the first survivor that gives it.
    let mut manifest = None;
    for (_, address, c) in &mut clients {
        match read_object(c, record, MANIFEST_PATH, 0, None).await {
            Ok(bytes) => {
                manifest = Some(bytes);
                break;
            }
            Err(why) => {
                tracing::warn!(node = %address, error = %why, "reading a manifest to rebuild from")
            }
        }
    }
    let manifest = manifest.ok_or_else(|| {
        read_failed(
            record,
            &record.nodes[at],
            "no survivor gave the manifest".to_owned(),
        )
    })?;
    let entries = decode_manifest(&manifest)
        .map_err(|e| read_failed(record, &record.nodes[at], e.to_string()))?;
    let (mut objects, mut bytes) = (0u64, 0u64);
    for entry in &entries {
        let piece = layout.shard_bytes(entry.size);
        target
            .send(Msg::Object(pb::ObjectBegin {
                path: entry.path.clone(),
                size: piece,
                crc32: None,
            }))
            .await?;
        for stripe in layout.stripes(entry.size) {
            let mut chunks: Vec<Option<Vec<u8>>> = vec![None; width];
            for (position, address, c) in &mut clients {
                let chunk = read_object(
                    c,
                    record,
                    &entry.path,
                    stripe.shard_offset,
                    Some(stripe.chunk_bytes),
                )
                .await
                .map_err(|why| read_failed(record, address, why))?;
                if chunk.len() as u64 != stripe.chunk_bytes {
                    return Err(read_failed(
                        record,
                        address,
                        format!(
                            "{}: a chunk of {} bytes, not {}",
                            entry.path,
                            chunk.len(),
                            stripe.chunk_bytes
                        ),
                    ));
                }
                let j = layout.chunk_on(&entry.path, stripe.index, *position) as usize;
                chunks[j] = Some(chunk);
            }
            codec
                .reconstruct(&mut chunks)
                .map_err(|e| read_failed(record, &record.nodes[at], format!("{e:?}")))?;
            let mine = layout.chunk_on(&entry.path, stripe.index, at) as usize;
            let chunk = chunks[mine].take().unwrap_or_default();
            target.send(Msg::Data(chunk.into())).await?;
        }
        objects += 1;
        bytes += piece;
    }
    target
        .send(Msg::Object(pb::ObjectBegin {
            path: MANIFEST_PATH.to_owned(),
            size: manifest.len() as u64,
            crc32: Some(crc32fast::hash(&manifest)),
        }))
        .await?;
    target.send(Msg::Data(manifest.clone().into())).await?;
    Ok((objects + 1, bytes + manifest.len() as u64))
}
