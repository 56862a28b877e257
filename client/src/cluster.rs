//! Reading a cluster dataset straight from its nodes.
//!
//! [`ClusterDataset::open`] asks any node once for the dataset's layout
//! and its nodes' addresses (`GetClusterDataset`) and reads the manifest
//! from the first node that gives it; after that no read asks a metadata
//! service: chunk j of stripe t of object p is on node
//! `(j + t + crc32(p)) mod (K+M)`
//! (`storaged_proto::cluster`). A read of objects (one, or a loader's
//! batch) asks each node once for every data chunk it holds of them, in
//! one call per node (grouped up to [`PIECE_GROUP_BYTES_MAX`]) over the
//! same transport a one-node read takes: a memory region on this host
//! (shm), the TCP bulk channel from another, else one `ReadBatch`; each
//! node verifies its bytes against their checksums as it serves them.
//! Where a node is down or fails, the stripes it left incomplete are read
//! again from parity and reconstructed, here on the client: the
//! bytes cross the network once, from the nodes that hold them, and no
//! node does the decoding work for another. The object is then checked
//! against its CRC-32 from the manifest, so a wrong shard from any node
//! is caught, never returned. A range read fetches only the parts of the
//! data chunks it covers (verified by their nodes against their block
//! checksums) and falls back to the whole stripe, rebuilt, where one
//! fails.
//!
//! The same dataset feeds the prefetching [`Loader`](crate::Loader)
//! (`ClusterDataset::loader`, in `loader::cluster`) and the Python
//! package, so a training job reads a cluster dataset as it reads a
//! single node's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use reed_solomon_erasure::galois_8::ReedSolomon;
use storaged_proto::cluster::{EcLayout, MANIFEST_PATH, ManifestEntry, Stripe, decode_manifest};
use storaged_proto::pb;

use crate::{
    Client, ClientError, ConnectOptions, ObjectInfo, ReadPath, RetryPolicy, SizedRange, Transport,
};

/// Why a cluster read failed (beyond a node's own status).
#[derive(Debug, thiserror::Error)]
pub enum ClusterReadError {
    #[error("cluster dataset {dataset:?} has no object {path:?}")]
    NoObject { dataset: String, path: String },
    #[error(
        "object {path:?}: only {got} of the {k} shards it needs could be read (nodes failing: {failures})"
    )]
    TooFewShards {
        path: String,
        got: usize,
        k: u32,
        failures: String,
    },
    #[error(
        "object {path:?}: the bytes rebuilt from the nodes fail its CRC-32 ({got:08x}, the manifest says {want:08x})"
    )]
    Checksum { path: String, got: u32, want: u32 },
    #[error("cluster dataset {dataset:?}: no node gave its manifest ({why})")]
    NoManifest { dataset: String, why: String },
    #[error("cluster dataset {0:?} has an invalid layout")]
    Layout(String),
    #[error("object {path:?}: bytes {offset}..+{length} are past its end ({size} bytes)")]
    OutOfRange {
        path: String,
        offset: u64,
        length: u64,
        size: u64,
    },
}

impl From<ClusterReadError> for ClientError {
    fn from(e: ClusterReadError) -> Self {
        let code = match &e {
            ClusterReadError::NoObject { .. } => tonic::Code::NotFound,
            ClusterReadError::TooFewShards { .. } | ClusterReadError::NoManifest { .. } => {
                tonic::Code::Unavailable
            }
            ClusterReadError::Checksum { .. } => tonic::Code::DataLoss,
            ClusterReadError::Layout(_) => tonic::Code::Internal,
            ClusterReadError::OutOfRange { .. } => tonic::Code::OutOfRange,
        };
        ClientError::Status(tonic::Status::new(code, e.to_string()))
    }
}

/// Stripes of one object read at once (each K chunk reads; 1 MiB chunks
/// make this 16 MiB per data node in flight at most).
const STRIPES_IN_FLIGHT: usize = 16;

/// Chunk bytes one call to a node asks for at most (and pieces at most
/// [`PIECE_GROUP_ITEMS_MAX`]): a larger read is cut into several calls.
pub const PIECE_GROUP_BYTES_MAX: u64 = 8 << 20;
const PIECE_GROUP_ITEMS_MAX: usize = 1024;

/// Calls in flight per node of the dataset during one read.
const GROUPS_IN_FLIGHT_PER_NODE: usize = 2;

/// How long a node that failed a read is skipped (its chunks read from
/// parity at once) before it is tried again: a node that does not answer
/// would otherwise cost every stripe a connect timeout.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// A call to a node (at most [`PIECE_GROUP_BYTES_MAX`]) that takes longer
/// is given up and its stripes read from parity: a node that hangs (stopped, or cut
/// off without a reset) costs one timeout, then [`SUSPECT_FOR`] of
/// parity reads.
const PIECE_TIMEOUT: Duration = Duration::from_secs(10);

/// One node of the dataset, connected on first use.
struct Node {
    id: String,
    /// Empty when the node was down when the layout was read.
    address: String,
    client: tokio::sync::Mutex<Option<Client>>,
    /// When it last failed a read.
    failed_at: Mutex<Option<std::time::Instant>>,
}

/// A cluster dataset, open for reading.
pub struct ClusterDataset {
    info: pb::ClusterDataset,
    layout: EcLayout,
    nodes: Vec<Node>,
    manifest: Vec<ManifestEntry>,
    index: HashMap<String, usize>,
    /// The manifest in path order, as a node lists a dataset.
    listing: Arc<[ObjectInfo]>,
    codec: ReedSolomon,
    /// How nodes are connected to (see [`ClusterDataset::open_with`]).
    transport: Transport,
    /// Whether nodes are reached over TLS (as the opening client was).
    tls: bool,
    options: ConnectOptions,
    /// Reads served with a reconstruction.
    degraded_reads: Mutex<u64>,
    /// Chunk bytes each path carried, since open.
    carried: Mutex<PathBytes>,
}

/// Chunk bytes each read path carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PathBytes {
    pub shm: u64,
    pub bulk: u64,
    pub grpc: u64,
}

impl PathBytes {
    fn add(&mut self, via: ReadPath, bytes: u64) {
        match via {
            ReadPath::Shm => self.shm += bytes,
            ReadPath::Bulk => self.bulk += bytes,
            ReadPath::Grpc => self.grpc += bytes,
        }
    }

    fn merge(&mut self, other: PathBytes) {
        self.shm += other.shm;
        self.bulk += other.bulk;
        self.grpc += other.grpc;
    }

    /// The path that carried the most bytes (gRPC when none carried any).
    pub fn most(&self) -> ReadPath {
        if self.shm > 0 && self.shm >= self.bulk && self.shm >= self.grpc {
            ReadPath::Shm
        } else if self.bulk > 0 && self.bulk >= self.grpc {
            ReadPath::Bulk
        } else {
            ReadPath::Grpc
        }
    }
}

/// One data chunk (or its part holding data) of a read, on its node.
struct Piece {
    /// Index of its stripe among the read's stripes.
    stripe: usize,
    chunk: u32,
    range: SizedRange,
}

impl std::fmt::Debug for ClusterDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterDataset")
            .field("name", &self.info.name)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// A node that is down answers nothing: a read gives up on it fast and
/// reads parity instead of waiting out the default retry budget.
fn node_retry() -> RetryPolicy {
    RetryPolicy {
        attempts_max: 2,
        budget: Duration::from_secs(2),
        ..RetryPolicy::default()
    }
}

impl ClusterDataset {
    /// Opens cluster dataset `name`, asking the node `client` talks to.
    /// FAILED_PRECONDITION when that node is not in a cluster. Nodes are
    /// connected with `client`'s credentials (its token, and TLS when it
    /// was asked for over `https://`) and read as its transport says: `grpc` reads every node over gRPC; any other choice takes
    /// each node's fastest path (shm for a node on this host, the TCP bulk
    /// channel for one that offers it, else gRPC), since one forced path
    /// (`shm`, `bulk`) cannot reach every node of a cluster.
    pub async fn open(client: &Client, name: &str) -> Result<ClusterDataset, ClientError> {
        let transport = match client.transport() {
            Transport::Grpc => Transport::Grpc,
            _ => Transport::Auto,
        };
        let info = client.get_cluster_dataset(name).await?;
        let (k, m) = (info.ec_data_units, info.ec_parity_units);
        let width = (k + m) as usize;
        if k == 0 || m == 0 || info.nodes.len() != width || info.chunk_bytes == 0 {
            return Err(ClusterReadError::Layout(name.to_owned()).into());
        }
        let codec = ReedSolomon::new(k as usize, m as usize)
            .map_err(|_| ClusterReadError::Layout(name.to_owned()))?;
        let nodes = info
            .nodes
            .iter()
            .map(|n| Node {
                id: n.node_id.clone(),
                address: n.advertise.clone(),
                client: tokio::sync::Mutex::new(None),
                failed_at: Mutex::new(None),
            })
            .collect();
        let mut dataset = ClusterDataset {
            layout: EcLayout {
                k,
                m,
                chunk_bytes: info.chunk_bytes,
            },
            info,
            nodes,
            manifest: Vec::new(),
            index: HashMap::new(),
            listing: Arc::new([]),
            codec,
            transport,
            tls: client.is_tls(),
            options: client.connect_options().clone(),
            degraded_reads: Mutex::new(0),
            carried: Mutex::default(),
        };
        dataset.manifest = dataset.read_manifest().await?;
        dataset.index = dataset
            .manifest
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), i))
            .collect();
        let mut listing: Vec<ObjectInfo> = dataset
            .manifest
            .iter()
            .map(|e| ObjectInfo {
                path: e.path.clone(),
                size: e.size,
                crc32: e.crc32,
            })
            .collect();
        listing.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        dataset.listing = listing.into();
        Ok(dataset)
    }

    /// Opens `name` when the node `client` talks to is in a cluster and
    /// has a cluster dataset by that name; `None` when it is not in a
    /// cluster or has none (a local dataset may still have the name).
    pub async fn open_if_cluster(
        client: &Client,
        name: &str,
    ) -> Result<Option<ClusterDataset>, ClientError> {
        match Self::open(client, name).await {
            Ok(dataset) => Ok(Some(dataset)),
            Err(ClientError::Status(s))
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The layout as the node gave it.
    pub fn info(&self) -> &pb::ClusterDataset {
        &self.info
    }

    /// Every object, in ingest order.
    pub fn objects(&self) -> &[ManifestEntry] {
        &self.manifest
    }

    /// Every object in path order (the order a node lists a dataset in,
    /// which plans index).
    pub fn listing(&self) -> Arc<[ObjectInfo]> {
        Arc::clone(&self.listing)
    }

    /// The manifest entry of `path`.
    pub fn entry(&self, path: &str) -> Result<&ManifestEntry, ClusterReadError> {
        self.index
            .get(path)
            .map(|&i| &self.manifest[i])
            .ok_or_else(|| ClusterReadError::NoObject {
                dataset: self.info.name.clone(),
                path: path.to_owned(),
            })
    }

    /// Reads that needed parity because a node was down or failed.
    pub fn degraded_reads(&self) -> u64 {
        *self.degraded_reads.lock().expect("counter poisoned")
    }

    /// Chunk bytes each read path carried since the dataset was opened.
    pub fn carried(&self) -> PathBytes {
        *self.carried.lock().expect("counter poisoned")
    }

    async fn read_manifest(&self) -> Result<Vec<ManifestEntry>, ClientError> {
        let mut why = Vec::new();
        for i in 0..self.nodes.len() {
            match self.read_shard(i, MANIFEST_PATH).await {
                Ok(bytes) => match decode_manifest(&bytes) {
                    Ok(m) => return Ok(m),
                    Err(e) => why.push(format!("{}: {e}", self.nodes[i].id)),
                },
                Err(e) => why.push(format!("{}: {e}", self.nodes[i].id)),
            }
        }
        Err(ClusterReadError::NoManifest {
            dataset: self.info.name.clone(),
            why: why.join("; "),
        }
        .into())
    }

    /// The client of node `i`, connected on first use.
    async fn node(&self, i: usize) -> Result<Client, ClientError> {
        let node = &self.nodes[i];
        let mut slot = node.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        if node.address.is_empty() {
            return Err(ClientError::Status(tonic::Status::unavailable(format!(
                "node {} was down when the layout was read",
                node.id
            ))));
        }
        let scheme = if self.tls { "https" } else { "http" };
        let url = format!("{scheme}://{}", node.address);
        let c = Client::connect_transport(&url, self.transport, &self.options)
            .await?
            .with_retry_policy(node_retry());
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Object `path` of node `i`'s unit dataset (the manifest), verified
    /// by the node.
    async fn read_shard(&self, i: usize, path: &str) -> Result<Bytes, ClientError> {
        let client = self.node(i).await?;
        client.dataset(&self.info.unit_dataset)?.read(path).await
    }

    /// `ranges` of node `i`'s pieces, in one call (a region on this host
    /// or over the bulk channel, else one `ReadBatch`): each range's own
    /// result, or the call's error. A node that failed within
    /// [`SUSPECT_FOR`] is not asked; a call that takes longer than
    /// [`PIECE_TIMEOUT`] fails. Also answers the bytes it read by path.
    async fn read_pieces(
        &self,
        i: usize,
        ranges: &[SizedRange],
    ) -> Result<(Vec<Result<Bytes, ClientError>>, PathBytes), ClientError> {
        let node = &self.nodes[i];
        let suspect = node
            .failed_at
            .lock()
            .expect("failed_at poisoned")
            .is_some_and(|at| at.elapsed() < SUSPECT_FOR);
        if suspect {
            return Err(ClientError::Status(tonic::Status::unavailable(format!(
                "node {} failed a read less than {} s ago",
                node.id,
                SUSPECT_FOR.as_secs()
            ))));
        }
        let call = async {
            let client = self.node(i).await?;
            client
                .dataset(&self.info.unit_dataset)?
                .read_ranges_sized(ranges)
                .await
        };
        let result = match tokio::time::timeout(PIECE_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Status(tonic::Status::unavailable(format!(
                "node {} did not answer a read within {} s",
                node.id,
                PIECE_TIMEOUT.as_secs()
            )))),
        };
        let failed_transiently = match &result {
            Err(e) => crate::retry::is_transient(e),
            Ok((results, _)) => results
                .iter()
                .any(|r| r.as_ref().is_err_and(crate::retry::is_transient)),
        };
        if failed_transiently {
            *node.failed_at.lock().expect("failed_at poisoned") = Some(std::time::Instant::now());
        }
        let (results, via) = result?;
        let mut here = PathBytes::default();
        let checked = results
            .into_iter()
            .zip(ranges)
            .map(|(r, range)| {
                let bytes = r?;
                if bytes.len() as u64 != range.length {
                    return Err(ClientError::ShortRead {
                        path: range.path.clone(),
                        expected: range.length,
                        got: bytes.len() as u64,
                    });
                }
                here.add(via, range.length);
                Ok(bytes)
            })
            .collect();
        self.carried.lock().expect("counter poisoned").merge(here);
        Ok((checked, here))
    }

    /// One range of node `i`'s pieces; see
    /// [`read_pieces`](Self::read_pieces).
    async fn read_piece(
        &self,
        i: usize,
        range: SizedRange,
    ) -> Result<(Bytes, PathBytes), ClientError> {
        let (mut results, carried) = self.read_pieces(i, std::slice::from_ref(&range)).await?;
        Ok((results.pop().expect("one result per range")?, carried))
    }

    /// Stripe `stripe` of the object at `path` (whose pieces are
    /// `piece_bytes` long): its K data chunks, each from its node, all at
    /// once; parity chunks in place of those that fail, and the data
    /// rebuilt.
    async fn read_stripe(
        &self,
        path: &str,
        piece_bytes: u64,
        stripe: Stripe,
    ) -> Result<StripeData, ClusterReadError> {
        let layout = self.layout;
        let (k, width) = (layout.k as usize, layout.width() as usize);
        let mut chunks: Vec<Option<Vec<u8>>> = vec![None; width];
        let mut failures = Vec::new();
        let mut carried = PathBytes::default();
        let (mut next, mut want) = (0usize, k);
        while want > 0 && next < width {
            let batch: Vec<usize> = (next..width.min(next + want)).collect();
            next += batch.len();
            let reads = batch.iter().map(|&j| {
                let node = layout.node_of(path, stripe.index, j as u32);
                let range = SizedRange {
                    path: path.to_owned(),
                    object_size: piece_bytes,
                    offset: stripe.shard_offset,
                    length: stripe.chunk_bytes,
                };
                async move { (j, node, self.read_piece(node, range).await) }
            });
            for (j, node, result) in join_all(reads).await {
                match result {
                    Ok((b, via)) => {
                        chunks[j] = Some(b.to_vec());
                        carried.merge(via);
                        want -= 1;
                    }
                    Err(e) => failures.push(format!("{}: {e}", self.nodes[node].id)),
                }
            }
        }
        if want > 0 {
            return Err(ClusterReadError::TooFewShards {
                path: path.to_owned(),
                got: k - want,
                k: layout.k,
                failures: failures.join("; "),
            });
        }
        let rebuilt = chunks[..k].iter().any(Option::is_none);
        if rebuilt {
            self.codec
                .reconstruct_data(&mut chunks)
                .map_err(|_| ClusterReadError::Layout(self.info.name.clone()))?;
        }
        let data = chunks
            .into_iter()
            .take(k)
            .map(|c| c.unwrap_or_default())
            .collect();
        Ok(StripeData {
            stripe,
            data,
            rebuilt,
            carried,
        })
    }

    /// Counts a read that needed parity.
    fn count_degraded(&self) {
        *self.degraded_reads.lock().expect("counter poisoned") += 1;
    }

    /// The whole object at `path`, checked against its CRC-32.
    pub async fn read(&self, path: &str) -> Result<Bytes, ClientError> {
        let (mut objects, _) = self
            .read_objects_carried(std::slice::from_ref(&path.to_owned()))
            .await?;
        Ok(objects.pop().expect("one object asked for"))
    }

    /// Whole objects, in the order asked, each checked against its CRC-32;
    /// the first that fails is the answer. See the module docs.
    pub async fn read_objects(&self, paths: &[String]) -> Result<Vec<Bytes>, ClientError> {
        Ok(self.read_objects_carried(paths).await?.0)
    }

    /// [`read_objects`](Self::read_objects), and the chunk bytes each read
    /// path carried for them.
    pub async fn read_objects_carried(
        &self,
        paths: &[String],
    ) -> Result<(Vec<Bytes>, PathBytes), ClientError> {
        let entries = paths
            .iter()
            .map(|p| self.entry(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut outs: Vec<Vec<u8>> = entries.iter().map(|e| vec![0u8; e.size as usize]).collect();
        let (k, width) = (self.layout.k, self.layout.width() as usize);
        // Every stripe of every object (object, stripe), and each node's
        // data pieces of them.
        let mut stripes: Vec<(usize, Stripe)> = Vec::new();
        let mut per_node: Vec<Vec<Piece>> = (0..width).map(|_| Vec::new()).collect();
        for (o, e) in entries.iter().enumerate() {
            let piece_bytes = self.layout.shard_bytes(e.size);
            for stripe in self.layout.stripes(e.size) {
                for chunk in 0..k {
                    let (_, length) = stripe.data_of_chunk(chunk);
                    if length == 0 {
                        continue;
                    }
                    let node = self.layout.node_of(&e.path, stripe.index, chunk);
                    per_node[node].push(Piece {
                        stripe: stripes.len(),
                        chunk,
                        range: SizedRange {
                            path: e.path.clone(),
                            object_size: piece_bytes,
                            offset: stripe.shard_offset,
                            length,
                        },
                    });
                }
                stripes.push((o, stripe));
            }
        }
        let mut carried = PathBytes::default();
        // The data chunks that did not come, by stripe.
        let mut missing: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        self.read_grouped(per_node, &mut carried, |piece, bytes| match bytes {
            Some(bytes) => {
                let (o, stripe) = &stripes[piece.stripe];
                let (at, _) = stripe.data_of_chunk(piece.chunk);
                outs[*o][at as usize..][..bytes.len()].copy_from_slice(&bytes);
            }
            None => missing.entry(piece.stripe).or_default().push(piece.chunk),
        })
        .await;
        let mut degraded = vec![false; entries.len()];
        if !missing.is_empty() {
            self.rebuild_missing(&entries, &stripes, &missing, &mut outs, &mut carried)
                .await?;
            for sid in missing.keys() {
                degraded[stripes[*sid].0] = true;
            }
        }
        let mut objects = Vec::with_capacity(entries.len());
        for ((e, bytes), degraded) in entries.iter().zip(outs).zip(degraded) {
            if degraded {
                self.count_degraded();
            }
            let got = crc32fast::hash(&bytes);
            if got != e.crc32 {
                return Err(ClusterReadError::Checksum {
                    path: e.path.clone(),
                    got,
                    want: e.crc32,
                }
                .into());
            }
            objects.push(Bytes::from(bytes));
        }
        Ok((objects, carried))
    }

    /// Reads every node's `per_node` pieces in groups, the nodes taking
    /// turns, and hands each piece with its bytes (`None`: its read
    /// failed) to `take`.
    async fn read_grouped(
        &self,
        per_node: Vec<Vec<Piece>>,
        carried: &mut PathBytes,
        mut take: impl FnMut(&Piece, Option<Bytes>),
    ) {
        let width = per_node.len();
        // The futures made first, not in a stream's closure: a closure
        // over borrowed data there makes the future not provably `Send`.
        let calls: Vec<_> = interleave(per_node.into_iter().map(group_pieces))
            .into_iter()
            .map(|(node, group)| async move {
                let ranges: Vec<SizedRange> = group.iter().map(|p| p.range.clone()).collect();
                let result = self.read_pieces(node, &ranges).await;
                (group, result)
            })
            .collect();
        let mut calls =
            futures::stream::iter(calls).buffer_unordered(GROUPS_IN_FLIGHT_PER_NODE * width);
        while let Some((group, result)) = calls.next().await {
            match result {
                Ok((datas, via)) => {
                    carried.merge(via);
                    for (piece, data) in group.iter().zip(datas) {
                        take(piece, data.ok());
                    }
                }
                Err(_) => group.iter().for_each(|piece| take(piece, None)),
            }
        }
    }

    /// Fills in the data chunks `missing` (by stripe) left out: for each
    /// such stripe as many parity chunks as it lacks data chunks, read in
    /// one call per node like the data, and the stripe rebuilt from them
    /// and the data chunks that came (so a node down costs its share of
    /// parity reads, not the stripes again). A stripe whose parity did not
    /// all come either is read whole, trying every node
    /// ([`read_stripe`](Self::read_stripe)).
    async fn rebuild_missing(
        &self,
        entries: &[&ManifestEntry],
        stripes: &[(usize, Stripe)],
        missing: &BTreeMap<usize, Vec<u32>>,
        outs: &mut [Vec<u8>],
        carried: &mut PathBytes,
    ) -> Result<(), ClientError> {
        let (k, width) = (self.layout.k, self.layout.width() as usize);
        let mut per_node: Vec<Vec<Piece>> = (0..width).map(|_| Vec::new()).collect();
        for (&sid, lost) in missing {
            let (o, stripe) = &stripes[sid];
            let e = entries[*o];
            // More data chunks lost than parity: the full read says why.
            for chunk in (k..self.layout.width()).take(lost.len()) {
                per_node[self.layout.node_of(&e.path, stripe.index, chunk)].push(Piece {
                    stripe: sid,
                    chunk,
                    range: SizedRange {
                        path: e.path.clone(),
                        object_size: self.layout.shard_bytes(e.size),
                        offset: stripe.shard_offset,
                        length: stripe.chunk_bytes,
                    },
                });
            }
        }
        let mut parity: BTreeMap<(usize, u32), Bytes> = BTreeMap::new();
        self.read_grouped(per_node, carried, |piece, bytes| {
            if let Some(bytes) = bytes {
                parity.insert((piece.stripe, piece.chunk), bytes);
            }
        })
        .await;
        let mut whole_reads = Vec::new();
        for (&sid, lost) in missing {
            let (o, stripe) = stripes[sid];
            let got: Vec<u32> = (k..self.layout.width())
                .filter(|&c| parity.contains_key(&(sid, c)))
                .collect();
            if got.len() < lost.len() {
                whole_reads.push((o, sid));
                continue;
            }
            let c = stripe.chunk_bytes as usize;
            let mut chunks: Vec<Option<Vec<u8>>> = vec![None; width];
            for j in (0..k).filter(|j| !lost.contains(j)) {
                let (at, len) = stripe.data_of_chunk(j);
                let mut chunk = vec![0u8; c];
                chunk[..len as usize].copy_from_slice(&outs[o][at as usize..(at + len) as usize]);
                chunks[j as usize] = Some(chunk);
            }
            for p in got {
                chunks[p as usize] = parity.remove(&(sid, p)).map(|b| b.to_vec());
            }
            self.codec
                .reconstruct_data(&mut chunks)
                .map_err(|_| ClusterReadError::Layout(self.info.name.clone()))?;
            for &j in lost {
                let (at, len) = stripe.data_of_chunk(j);
                let chunk = chunks[j as usize].as_ref().expect("rebuilt");
                outs[o][at as usize..(at + len) as usize].copy_from_slice(&chunk[..len as usize]);
            }
        }
        // The futures made first (see `read_grouped`).
        let reads: Vec<_> = whole_reads
            .into_iter()
            .map(|(o, sid)| {
                let e = entries[o];
                let piece_bytes = self.layout.shard_bytes(e.size);
                let stripe = stripes[sid].1;
                async move { (o, self.read_stripe(&e.path, piece_bytes, stripe).await) }
            })
            .collect();
        let mut reads = futures::stream::iter(reads).buffer_unordered(STRIPES_IN_FLIGHT);
        while let Some((o, result)) = reads.next().await {
            let done = result?;
            carried.merge(done.carried);
            for (j, chunk) in done.data.iter().enumerate() {
                let (at, len) = done.stripe.data_of_chunk(j as u32);
                outs[o][at as usize..(at + len) as usize].copy_from_slice(&chunk[..len as usize]);
            }
        }
        Ok(())
    }

    /// `length` bytes of `path` from `offset`; past the end is
    /// OUT_OF_RANGE. Only the parts of the data chunks the range covers
    /// are read, in one call per node like whole objects, each verified by
    /// its node against its block checksums (the object's CRC-32 covers
    /// whole objects only, so the whole object is read, and checked, when
    /// the range is all of it). A stripe a node fails is read whole, with
    /// parity.
    pub async fn read_range(
        &self,
        path: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, ClientError> {
        let entry = self.entry(path)?;
        if offset > entry.size || length > entry.size - offset {
            return Err(ClusterReadError::OutOfRange {
                path: path.to_owned(),
                offset,
                length,
                size: entry.size,
            }
            .into());
        }
        if offset == 0 && length == entry.size {
            return self.read(path).await;
        }
        let end = offset + length;
        let piece_bytes = self.layout.shard_bytes(entry.size);
        let width = self.layout.width() as usize;
        let stripes: Vec<Stripe> = self
            .layout
            .stripes(entry.size)
            .filter(|s| s.object_offset < end && s.object_offset + s.data_bytes > offset)
            .collect();
        // Each node's parts of the data chunks within the range.
        let mut per_node: Vec<Vec<Piece>> = (0..width).map(|_| Vec::new()).collect();
        for (sid, stripe) in stripes.iter().enumerate() {
            for chunk in 0..self.layout.k {
                let (at, len) = stripe.data_of_chunk(chunk);
                let (a, b) = (at.max(offset), (at + len).min(end));
                if a >= b {
                    continue;
                }
                per_node[self.layout.node_of(path, stripe.index, chunk)].push(Piece {
                    stripe: sid,
                    chunk,
                    range: SizedRange {
                        path: path.to_owned(),
                        object_size: piece_bytes,
                        offset: stripe.shard_offset + (a - at),
                        length: b - a,
                    },
                });
            }
        }
        let mut out = vec![0u8; length as usize];
        let mut failed = BTreeSet::new();
        let mut carried = PathBytes::default();
        self.read_grouped(per_node, &mut carried, |piece, bytes| match bytes {
            Some(bytes) => {
                let stripe = &stripes[piece.stripe];
                let (at, _) = stripe.data_of_chunk(piece.chunk);
                let from = (at + piece.range.offset - stripe.shard_offset - offset) as usize;
                out[from..from + bytes.len()].copy_from_slice(&bytes);
            }
            None => {
                failed.insert(piece.stripe);
            }
        })
        .await;
        let rereads: Vec<_> = failed
            .iter()
            .map(|&sid| self.read_stripe(path, piece_bytes, stripes[sid]))
            .collect();
        let mut rereads = futures::stream::iter(rereads).buffer_unordered(STRIPES_IN_FLIGHT);
        while let Some(done) = rereads.next().await {
            let done = done?;
            if done.rebuilt {
                self.count_degraded();
            }
            for (j, chunk) in done.data.iter().enumerate() {
                let (at, len) = done.stripe.data_of_chunk(j as u32);
                let (a, b) = (at.max(offset), (at + len).min(end));
                if a < b {
                    out[(a - offset) as usize..(b - offset) as usize]
                        .copy_from_slice(&chunk[(a - at) as usize..(b - at) as usize]);
                }
            }
        }
        Ok(Bytes::from(out))
    }
}

/// A stripe's data chunks as [`ClusterDataset::read_stripe`] read them.
struct StripeData {
    stripe: Stripe,
    data: Vec<Vec<u8>>,
    /// Whether parity stood in for a data chunk.
    rebuilt: bool,
    carried: PathBytes,
}

/// One node's pieces cut into calls of at most [`PIECE_GROUP_BYTES_MAX`]
/// and [`PIECE_GROUP_ITEMS_MAX`] (one piece always goes, however large).
fn group_pieces(pieces: Vec<Piece>) -> Vec<Vec<Piece>> {
    let mut groups: Vec<Vec<Piece>> = Vec::new();
    let mut bytes = 0u64;
    for piece in pieces {
        let full = groups.last().is_none_or(|g| {
            g.len() >= PIECE_GROUP_ITEMS_MAX || bytes + piece.range.length > PIECE_GROUP_BYTES_MAX
        });
        if full {
            groups.push(Vec::new());
            bytes = 0;
        }
        bytes += piece.range.length;
        groups.last_mut().expect("a group").push(piece);
    }
    groups
}

/// Every node's groups `(node, group)`, the nodes taking turns, so that a
/// read keeps every node busy from its start.
fn interleave(per_node: impl Iterator<Item = Vec<Vec<Piece>>>) -> Vec<(usize, Vec<Piece>)> {
    let mut queues: Vec<std::vec::IntoIter<Vec<Piece>>> =
        per_node.map(|groups| groups.into_iter()).collect();
    let mut out = Vec::new();
    loop {
        let before = out.len();
        for (node, queue) in queues.iter_mut().enumerate() {
            if let Some(group) = queue.next() {
                out.push((node, group));
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(stripe: usize, length: u64) -> Piece {
        Piece {
            stripe,
            chunk: 0,
            range: SizedRange {
                path: format!("p{stripe}"),
                object_size: length,
                offset: 0,
                length,
            },
        }
    }

    #[test]
    fn groups_stay_within_their_bytes_and_keep_every_piece_in_order() {
        // Guards against a call to a node growing past its bound (one
        // region, one timeout) or a piece lost or reordered between groups.
        let mib = 1 << 20;
        let sizes = [3 * mib, 3 * mib, 3 * mib, 20 * mib, 1, 8 * mib, 0];
        let pieces = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| piece(i, n))
            .collect();
        let groups = group_pieces(pieces);
        let shape: Vec<Vec<usize>> = groups
            .iter()
            .map(|g| g.iter().map(|p| p.stripe).collect())
            .collect();
        // A piece larger than the bound goes alone.
        assert_eq!(
            shape,
            vec![vec![0, 1], vec![2], vec![3], vec![4], vec![5, 6]]
        );
        for g in &groups {
            let bytes: u64 = g.iter().map(|p| p.range.length).sum();
            assert!(g.len() == 1 || bytes <= PIECE_GROUP_BYTES_MAX, "{bytes}");
        }
        let many = (0..PIECE_GROUP_ITEMS_MAX + 5)
            .map(|i| piece(i, 1))
            .collect();
        let lens: Vec<usize> = group_pieces(many).iter().map(Vec::len).collect();
        assert_eq!(lens, vec![PIECE_GROUP_ITEMS_MAX, 5]);
        assert!(group_pieces(Vec::new()).is_empty());
    }

    #[test]
    fn nodes_take_turns_so_every_node_starts_at_once() {
        let per_node = vec![
            vec![vec![piece(0, 1)], vec![piece(1, 1)], vec![piece(2, 1)]],
            vec![],
            vec![vec![piece(3, 1)]],
        ];
        let order: Vec<(usize, usize)> = interleave(per_node.into_iter())
            .iter()
            .map(|(node, g)| (*node, g[0].stripe))
            .collect();
        assert_eq!(order, vec![(0, 0), (2, 3), (0, 1), (0, 2)]);
    }

    #[test]
    fn a_batch_counts_as_served_by_the_path_that_carried_most() {
        let mut b = PathBytes::default();
        assert_eq!(b.most(), ReadPath::Grpc, "nothing carried");
        b.add(ReadPath::Grpc, 10);
        b.add(ReadPath::Shm, 11);
        assert_eq!(b.most(), ReadPath::Shm);
        b.merge(PathBytes {
            bulk: 30,
            ..PathBytes::default()
        });
        assert_eq!(b.most(), ReadPath::Bulk);
    }
}
