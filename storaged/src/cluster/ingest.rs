//! A cluster ingest, coordinated by the node the client sent it to: it
//! cuts every object into stripes of K data and M parity chunks
//! (`storaged_proto::cluster`), streams each chunk to its node as part of
//! an object of that node's unit dataset (an ordinary local ingest there, so every
//! shard byte is checksummed and durable on its node before the node
//! answers), writes the manifest into every unit, and only when every
//! node has committed records the dataset in the control plane: one
//! commit, conditional on the name being free and on the ingest's intent
//! (a key on the coordinator's lease) still being there.
//!
//! A coordinator that dies leaves no dataset record; its intent vanishes
//! with its lease, and the nodes' orphan sweep ([`super::sweep`]) deletes
//! the units nobody records. Memory is bounded: one stripe (K chunks) and
//! its parity, plus [`UNIT_QUEUE_MESSAGES`] messages per node in flight,
//! plus the manifest (at most [`MANIFEST_BYTES_MAX`]).

use std::sync::Arc;

use reed_solomon_erasure::galois_8::ReedSolomon;
use storaged_proto::cluster::{
    EcLayout, MANIFEST_PATH, ManifestEntry, RESERVED_DIR, UNIT_PREFIX, encode_manifest,
};
use storaged_proto::pb;
use storaged_proto::pb::ingest_request::Msg;
use tokio::sync::mpsc;

use super::control::{Condition, ControlError, Write};
use super::member::Member;
use super::peer::{PeerLink, node_client};
use super::records::{
    DatasetRecord, IngestIntent, Placement, RECORD_FORMAT, decode, encode, unix_now_s,
};

/// Bytes of one chunk of a full stripe.
pub const CHUNK_BYTES: u64 = 1 << 20;
/// Messages queued to one node before the coordinator waits for it.
pub const UNIT_QUEUE_MESSAGES: usize = 8;
/// Largest manifest (paths, sizes, CRCs of every object) one ingest may
/// build: about 3 million objects of 64-byte paths.
pub const MANIFEST_BYTES_MAX: usize = 256 << 20;
pub use super::peer::NODE_CONNECT_TIMEOUT;
/// A node that takes no message for this long is failed (a stopped or
/// cut-off node would otherwise hold the ingest, and its client, forever).
pub const UNIT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest data message sent to a node (its gRPC limit is 8 MiB).
const UNIT_MESSAGE_BYTES_MAX: usize = 1 << 20;
/// Most shards per object (K + M).
pub const WIDTH_MAX: u32 = 32;

/// Why a cluster ingest failed. Nothing of it is visible in any case.
#[derive(Debug, thiserror::Error)]
pub enum ClusterIngestError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cluster dataset {0:?} already exists")]
    Exists(String),
    #[error(
        "{class} needs {need} nodes up and in the placement map; the cluster has {up} (of {placed} placed): use a smaller K+M or bring nodes up"
    )]
    NotEnoughNodes {
        class: String,
        need: usize,
        up: usize,
        placed: usize,
    },
    #[error("{0}")]
    Class(String),
    #[error("node {node} ({address}) failed its share: {why}")]
    Node {
        node: String,
        address: String,
        why: String,
    },
    #[error("{0}")]
    Input(String),
    #[error(
        "the ingest of {0:?} lost its intent before the commit (the coordinator's lease expired): nothing was recorded; retry"
    )]
    IntentLost(String),
    #[error("the manifest would pass {MANIFEST_BYTES_MAX} bytes: split the dataset")]
    ManifestTooLarge,
    #[error(
        "the placement changed while {dataset:?} was ingested (epoch {from} -> {to}): node(s) {} left it, so nothing was recorded; retry",
        left.join(", ")
    )]
    PlacementChanged {
        dataset: String,
        from: u64,
        to: u64,
        left: Vec<String>,
    },
}

/// One node's share: the queue feeding its Ingest call.
pub(super) struct UnitStream {
    node: String,
    address: String,
    tx: Option<mpsc::Sender<pb::IngestRequest>>,
    call: tokio::task::JoinHandle<Result<pb::IngestResponse, tonic::Status>>,
    /// Shard bytes sent (for the commit's totals).
    bytes: u64,
}

/// The object being received.
struct OpenObject {
    path: String,
    size: u64,
    expected_crc32: Option<u32>,
    received: u64,
    crc: crc32fast::Hasher,
    /// Bytes of the current stripe received so far.
    stripe: Vec<u8>,
    stripes: Box<dyn Iterator<Item = storaged_proto::cluster::Stripe> + Send>,
    current: Option<storaged_proto::cluster::Stripe>,
}

/// A cluster ingest under way.
pub struct ClusterIngest {
    member: Arc<Member>,
    name: String,
    unit: String,
    layout: EcLayout,
    placement_epoch: u64,
    intent_key: String,
    intent_revision: i64,
    units: Vec<UnitStream>,
    codec: ReedSolomon,
    object: Option<OpenObject>,
    manifest: Vec<ManifestEntry>,
    manifest_bytes: usize,
    total_bytes: u64,
}

/// The class K+M of a cluster ingest: as asked, or ec:(N-1)+1 over the N
/// nodes up (at least 3, at most 9).
pub fn cluster_class(asked: Option<(u32, u32)>, up: usize) -> Result<(u32, u32), String> {
    let (k, m) = match asked {
        Some(km) => km,
        None if up >= 3 => (up.min(9) as u32 - 1, 1),
        None => {
            return Err(format!(
                "a cluster dataset needs at least 3 nodes up for the default class ec:(N-1)+1; {up} are up: give --class ec:K+M"
            ));
        }
    };
    if k == 0 || m == 0 || k + m > WIDTH_MAX {
        return Err(format!(
            "cluster datasets are erasure-coded across nodes: ec:K+M with K >= 1, M >= 1 and K+M <= {WIDTH_MAX} (got ec:{k}+{m})"
        ));
    }
    Ok((k, m))
}

impl ClusterIngest {
    /// Begins the ingest of cluster dataset `name`: picks K+M nodes up
    /// and placed, records the intent on the coordinator's lease, and
    /// opens an Ingest of the unit dataset on each.
    pub async fn begin(
        member: Arc<Member>,
        name: &str,
        class: Option<(u32, u32)>,
    ) -> Result<ClusterIngest, ClusterIngestError> {
        let keys = member.keys().clone();
        let control = member.control();
        if control.get(&keys.dataset(name)).await?.is_some() {
            return Err(ClusterIngestError::Exists(name.to_owned()));
        }
        let view = member.view().await?;
        let up: Vec<(String, String)> = view
            .placement
            .nodes
            .iter()
            .filter_map(|id| {
                let n = view.nodes.iter().find(|n| &n.node_id == id)?;
                let live = n.live.as_ref()?;
                n.member.as_ref()?;
                Some((id.clone(), live.advertise.clone()))
            })
            .collect();
        let (k, m) = cluster_class(class, up.len()).map_err(ClusterIngestError::Class)?;
        let width = (k + m) as usize;
        if up.len() < width {
            return Err(ClusterIngestError::NotEnoughNodes {
                class: format!("ec:{k}+{m}"),
                need: width,
                up: up.len(),
                placed: view.placement.nodes.len(),
            });
        }
        // Start where the name hashes to, so datasets spread over the
        // nodes rather than all beginning on the first.
        let start = crc32fast::hash(name.as_bytes()) as usize % up.len();
        let chosen: Vec<(String, String)> = (0..width)
            .map(|i| up[(start + i) % up.len()].clone())
            .collect();
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| ClusterIngestError::Input(e.to_string()))?;
        let unit = format!(
            "{UNIT_PREFIX}{}",
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let intent = IngestIntent {
            format: RECORD_FORMAT,
            dataset: name.to_owned(),
            unit: unit.clone(),
            nodes: chosen.iter().map(|(id, _)| id.clone()).collect(),
            coordinator: member.node_id().to_owned(),
            started_unix_s: unix_now_s(),
        };
        let intent_key = keys.ingest(&unit);
        let lease = member.lease().ok_or_else(|| ControlError::Unreachable {
            endpoint: control.endpoint().to_owned(),
            why: "this node holds no lease (its last heartbeat failed)".to_owned(),
        })?;
        if !control
            .commit(
                vec![Condition::Absent(intent_key.clone())],
                vec![Write::Put {
                    key: intent_key.clone(),
                    value: encode(&intent),
                    lease: Some(lease),
                }],
            )
            .await?
        {
            return Err(ClusterIngestError::Input(format!(
                "ingest id {unit} is taken; retry"
            )));
        }
        let opened = async {
            let intent_revision = control
                .get(&intent_key)
                .await?
                .map(|e| e.mod_revision)
                .ok_or_else(|| ClusterIngestError::IntentLost(name.to_owned()))?;
            let mut units = Vec::with_capacity(width);
            for (node, address) in chosen {
                units.push(open_unit(member.peers(), node, address, &unit).await?);
            }
            let codec = ReedSolomon::new(k as usize, m as usize)
                .map_err(|e| ClusterIngestError::Class(format!("ec:{k}+{m}: {e:?}")))?;
            Ok::<_, ClusterIngestError>((intent_revision, units, codec))
        }
        .await;
        let (intent_revision, units, codec) = match opened {
            Ok(o) => o,
            Err(e) => {
                // The intent would otherwise stay as long as this node's
                // lease, naming an ingest that never ran.
                let _ = control
                    .commit(Vec::new(), vec![Write::Delete { key: intent_key }])
                    .await;
                return Err(e);
            }
        };
        Ok(ClusterIngest {
            member,
            name: name.to_owned(),
            unit,
            layout: EcLayout {
                k,
                m,
                chunk_bytes: CHUNK_BYTES,
            },
            placement_epoch: view.placement.epoch,
            intent_key,
            intent_revision,
            units,
            codec,
            object: None,
            manifest: Vec::new(),
            manifest_bytes: 0,
            total_bytes: 0,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// K and M.
    pub fn class(&self) -> (u32, u32) {
        (self.layout.k, self.layout.m)
    }

    /// The next object: `size` bytes follow.
    pub async fn begin_object(
        &mut self,
        path: &str,
        size: u64,
        crc32: Option<u32>,
    ) -> Result<(), ClusterIngestError> {
        if self.object.is_some() {
            return Err(ClusterIngestError::Input(
                "an object began before the previous one had all its bytes".to_owned(),
            ));
        }
        if path.starts_with(RESERVED_DIR) {
            return Err(ClusterIngestError::Input(format!(
                "object path {path:?}: {RESERVED_DIR} is reserved for cluster metadata"
            )));
        }
        self.manifest_bytes += path.len() + 14;
        if self.manifest_bytes > MANIFEST_BYTES_MAX {
            return Err(ClusterIngestError::ManifestTooLarge);
        }
        let shard_bytes = self.layout.shard_bytes(size);
        for u in 0..self.units.len() {
            self.send(
                u,
                Msg::Object(pb::ObjectBegin {
                    path: path.to_owned(),
                    size: shard_bytes,
                    crc32: None,
                }),
            )
            .await?;
        }
        let mut stripes = Box::new(self.layout.stripes(size));
        let current = stripes.next();
        self.object = Some(OpenObject {
            path: path.to_owned(),
            size,
            expected_crc32: crc32,
            received: 0,
            crc: crc32fast::Hasher::new(),
            stripe: Vec::new(),
            stripes,
            current,
        });
        if size == 0 {
            self.end_object()?;
        }
        Ok(())
    }

    /// Bytes of the current object.
    pub async fn data(&mut self, mut bytes: &[u8]) -> Result<(), ClusterIngestError> {
        while !bytes.is_empty() {
            let Some(o) = self.object.as_mut() else {
                return Err(ClusterIngestError::Input(
                    "data arrived outside an object (more bytes than its size)".to_owned(),
                ));
            };
            let Some(stripe) = o.current else {
                return Err(ClusterIngestError::Input(format!(
                    "object {:?}: more bytes than its size {}",
                    o.path, o.size
                )));
            };
            let want = (stripe.data_bytes as usize).saturating_sub(o.stripe.len());
            let take = want.min(bytes.len());
            o.stripe.extend_from_slice(&bytes[..take]);
            o.crc.update(&bytes[..take]);
            o.received += take as u64;
            bytes = &bytes[take..];
            if o.stripe.len() as u64 == stripe.data_bytes {
                self.flush_stripe(stripe).await?;
                let o = self.object.as_mut().expect("open object");
                o.stripe.clear();
                o.current = o.stripes.next();
                if o.current.is_none() {
                    self.end_object()?;
                }
            }
        }
        Ok(())
    }

    /// Encodes the buffered stripe and sends each chunk to its node.
    async fn flush_stripe(
        &mut self,
        stripe: storaged_proto::cluster::Stripe,
    ) -> Result<(), ClusterIngestError> {
        let o = self.object.as_ref().expect("open object");
        let chunk = stripe.chunk_bytes as usize;
        let k = self.layout.k as usize;
        let mut shards: Vec<Vec<u8>> = (0..self.layout.width() as usize)
            .map(|_| vec![0u8; chunk])
            .collect();
        for (j, shard) in shards.iter_mut().enumerate().take(k) {
            let (at, len) = stripe.data_of_chunk(j as u32);
            let at = (at - stripe.object_offset) as usize;
            shard[..len as usize].copy_from_slice(&o.stripe[at..at + len as usize]);
        }
        self.codec
            .encode(&mut shards)
            .map_err(|e| ClusterIngestError::Input(format!("erasure coding: {e:?}")))?;
        let path = o.path.clone();
        for (j, shard) in shards.into_iter().enumerate() {
            let u = self.layout.node_of(&path, stripe.index, j as u32);
            self.units[u].bytes += shard.len() as u64;
            self.send(u, Msg::Data(shard.into())).await?;
        }
        Ok(())
    }

    /// The object has all its bytes: check them and list it.
    fn end_object(&mut self) -> Result<(), ClusterIngestError> {
        let o = self.object.take().expect("open object");
        let crc32 = o.crc.finalize();
        if let Some(expected) = o.expected_crc32
            && expected != crc32
        {
            return Err(ClusterIngestError::Input(format!(
                "object {:?}: CRC-32 {crc32:08x} of the bytes received, the client said {expected:08x}",
                o.path
            )));
        }
        self.total_bytes += o.size;
        self.manifest.push(ManifestEntry {
            path: o.path,
            size: o.size,
            crc32,
        });
        Ok(())
    }

    async fn send(&mut self, u: usize, msg: Msg) -> Result<(), ClusterIngestError> {
        self.units[u].send(msg).await
    }

    /// Commits: the manifest into every unit, every unit committed on its
    /// node, then the dataset recorded in the control plane.
    pub async fn commit(
        mut self,
        object_count: u64,
        total_bytes: u64,
    ) -> Result<DatasetRecord, ClusterIngestError> {
        if let Some(o) = &self.object {
            return Err(ClusterIngestError::Input(format!(
                "commit before object {:?} had all its bytes ({} of {})",
                o.path, o.received, o.size
            )));
        }
        if object_count != self.manifest.len() as u64 || total_bytes != self.total_bytes {
            return Err(ClusterIngestError::Input(format!(
                "commit says {object_count} objects and {total_bytes} bytes; {} and {} were received",
                self.manifest.len(),
                self.total_bytes
            )));
        }
        let manifest = encode_manifest(&self.manifest);
        for u in 0..self.units.len() {
            self.send(
                u,
                Msg::Object(pb::ObjectBegin {
                    path: MANIFEST_PATH.to_owned(),
                    size: manifest.len() as u64,
                    crc32: Some(crc32fast::hash(&manifest)),
                }),
            )
            .await?;
            for piece in manifest.chunks(UNIT_MESSAGE_BYTES_MAX) {
                self.send(u, Msg::Data(bytes::Bytes::copy_from_slice(piece)))
                    .await?;
            }
            let unit_bytes = self.units[u].bytes + manifest.len() as u64;
            self.send(
                u,
                Msg::Commit(pb::IngestCommit {
                    object_count: object_count + 1,
                    total_bytes: unit_bytes,
                }),
            )
            .await?;
        }
        for unit in &mut self.units {
            unit.finish().await?;
        }
        let mut record = DatasetRecord {
            format: RECORD_FORMAT,
            name: self.name.clone(),
            k: self.layout.k,
            m: self.layout.m,
            chunk_bytes: self.layout.chunk_bytes,
            unit: self.unit.clone(),
            nodes: self.units.iter().map(|u| u.node.clone()).collect(),
            placement_epoch: self.placement_epoch,
            object_count,
            total_bytes,
            created_unix_s: unix_now_s(),
        };
        let keys = self.member.keys().clone();
        let dataset_key = keys.dataset(&self.name);
        let control = self.member.control();
        let mut committed = false;
        for _ in 0..16 {
            // Every chosen node must still be placed: a node drained
            // while this ingest ran would otherwise end "drained" holding
            // a share of it (the drain lists only committed datasets).
            let placement = control.get(&keys.placement()).await?;
            let (map, revision) = match &placement {
                Some(e) => (decode::<Placement>(e)?, e.mod_revision),
                None => (Placement::default(), 0),
            };
            let left: Vec<String> = record
                .nodes
                .iter()
                .filter(|n| !map.nodes.contains(n))
                .cloned()
                .collect();
            if !left.is_empty() {
                return Err(ClusterIngestError::PlacementChanged {
                    dataset: self.name.clone(),
                    from: self.placement_epoch,
                    to: map.epoch,
                    left,
                });
            }
            record.placement_epoch = map.epoch;
            committed = control
                .commit(
                    vec![
                        Condition::Absent(dataset_key.clone()),
                        Condition::Unchanged {
                            key: self.intent_key.clone(),
                            mod_revision: self.intent_revision,
                        },
                        Condition::Unchanged {
                            key: keys.placement(),
                            mod_revision: revision,
                        },
                    ],
                    vec![
                        Write::Put {
                            key: dataset_key.clone(),
                            value: encode(&record),
                            lease: None,
                        },
                        Write::Delete {
                            key: self.intent_key.clone(),
                        },
                    ],
                )
                .await?;
            if committed {
                break;
            }
            if control.get(&dataset_key).await?.is_some() {
                return Err(ClusterIngestError::Exists(self.name.clone()));
            }
            if control.get(&self.intent_key).await?.is_none() {
                return Err(ClusterIngestError::IntentLost(self.name.clone()));
            }
            // The placement map moved on (a join): check it again.
        }
        if !committed {
            return Err(ClusterIngestError::IntentLost(self.name.clone()));
        }
        // Nobody needs the intent any more (the commit deleted it); the
        // units are the dataset's now.
        self.intent_key.clear();
        tracing::info!(
            dataset = %record.name,
            unit = %record.unit,
            nodes = ?record.nodes,
            objects = record.object_count,
            bytes = record.total_bytes,
            "cluster dataset committed"
        );
        Ok(record)
    }
}

impl Drop for ClusterIngest {
    fn drop(&mut self) {
        // An ingest that ends without its commit: the unit calls end
        // without theirs (their nodes discard them), and the intent is
        // deleted so the units are orphans at once, not only when this
        // node's lease expires.
        for u in &mut self.units {
            u.tx = None;
        }
        if !self.intent_key.is_empty() {
            let control = self.member.control();
            let key = std::mem::take(&mut self.intent_key);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = control
                        .commit(Vec::new(), vec![Write::Delete { key }])
                        .await;
                });
            }
        }
    }
}

impl UnitStream {
    /// Queues one message for the node.
    pub(super) async fn send(&mut self, msg: Msg) -> Result<(), ClusterIngestError> {
        let sent = match &self.tx {
            Some(tx) => {
                let request = pb::IngestRequest { msg: Some(msg) };
                match tokio::time::timeout(UNIT_SEND_TIMEOUT, tx.send(request)).await {
                    Ok(sent) => sent.is_ok(),
                    Err(_) => {
                        return Err(self.failed(format!(
                            "it took nothing for {} s",
                            UNIT_SEND_TIMEOUT.as_secs()
                        )));
                    }
                }
            }
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The call ended early: its status says why.
        self.tx = None;
        let why = match (&mut self.call).await {
            Ok(Err(status)) => status.message().to_owned(),
            Ok(Ok(_)) => "it ended the ingest early".to_owned(),
            Err(e) => e.to_string(),
        };
        Err(self.failed(why))
    }

    /// Ends the stream (after its commit) and waits for the node's answer.
    pub(super) async fn finish(&mut self) -> Result<(), ClusterIngestError> {
        self.tx = None;
        match (&mut self.call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(self.failed(status.message().to_owned())),
            Err(e) => Err(self.failed(e.to_string())),
        }
    }

    fn failed(&self, why: String) -> ClusterIngestError {
        ClusterIngestError::Node {
            node: self.node.clone(),
            address: self.address.clone(),
            why,
        }
    }
}

/// Opens the Ingest of `unit` on `node`.
pub(super) async fn open_unit(
    link: &PeerLink,
    node: String,
    address: String,
    unit: &str,
) -> Result<UnitStream, ClusterIngestError> {
    let failed = |why: String| ClusterIngestError::Node {
        node: node.clone(),
        address: address.clone(),
        why,
    };
    let mut client = node_client(link, &address).await.map_err(failed)?;
    let (tx, rx) = mpsc::channel(UNIT_QUEUE_MESSAGES);
    tx.send(pb::IngestRequest {
        msg: Some(Msg::Begin(pb::IngestBegin {
            dataset: unit.to_owned(),
            storage_class: pb::StorageClass::Stripe as i32,
            ec_data_units: 0,
            ec_parity_units: 0,
            cluster_unit: true,
        })),
    })
    .await
    .map_err(|_| failed("the unit stream closed".to_owned()))?;
    let call = tokio::spawn(async move {
        client
            .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
    });
    Ok(UnitStream {
        node,
        address,
        tx: Some(tx),
        call,
        bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_class_is_asked_or_spans_the_nodes_up() {
        assert_eq!(cluster_class(Some((2, 1)), 3), Ok((2, 1)));
        assert_eq!(cluster_class(None, 3), Ok((2, 1)));
        assert_eq!(cluster_class(None, 4), Ok((3, 1)));
        assert_eq!(cluster_class(None, 40), Ok((8, 1)));
        assert!(
            cluster_class(None, 2)
                .unwrap_err()
                .contains("at least 3 nodes")
        );
        for bad in [(0, 1), (2, 0), (30, 3)] {
            assert!(cluster_class(Some(bad), 40).is_err(), "{bad:?}");
        }
    }
}
