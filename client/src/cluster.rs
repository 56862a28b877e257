//! Reading a cluster dataset straight from its nodes.
//!
//! [`ClusterDataset::open`] asks any node once for the dataset's layout
//! and its nodes' addresses (`GetClusterDataset`) and reads the manifest
//! from the first node that gives it; after that no read asks a metadata
//! service: chunk j of stripe t of object p is on node
//! `(j + t + crc32(p)) mod (K+M)`
//! (`storaged_proto::cluster`). A read fetches every stripe's K data
//! chunks in parallel, each from its own node (each node verifies its
//! bytes against their checksums as it serves them); when a node is down
//! or fails, it fetches that stripe's parity chunks instead and
//! reconstructs, here on the client: the
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use futures::{StreamExt, TryStreamExt};
use reed_solomon_erasure::galois_8::ReedSolomon;
use storaged_proto::cluster::{EcLayout, MANIFEST_PATH, ManifestEntry, Stripe, decode_manifest};
use storaged_proto::pb;

use crate::{Client, ClientError, ObjectInfo, RetryPolicy};

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

/// Objects [`ClusterDataset::read_objects`] reads at once (each with up to
/// [`STRIPES_IN_FLIGHT`] stripes of its own).
pub const CLUSTER_OBJECTS_IN_FLIGHT: usize = 32;

/// How long a node that failed a read is skipped (its chunks read from
/// parity at once) before it is tried again: a node that does not answer
/// would otherwise cost every stripe a connect timeout.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// A chunk read (at most one chunk, 1 MiB by default) that takes longer
/// is given up and read from parity: a node that hangs (stopped, or cut
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
    /// Reads served with a reconstruction.
    degraded_reads: Mutex<u64>,
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
    /// FAILED_PRECONDITION when that node is not in a cluster.
    pub async fn open(client: &Client, name: &str) -> Result<ClusterDataset, ClientError> {
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
            degraded_reads: Mutex::new(0),
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
        let c = Client::connect(&format!("http://{}", node.address))
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

    /// Bytes `[offset, offset + len)` of node `i`'s piece of `path`. A
    /// node that failed within [`SUSPECT_FOR`] is not asked.
    async fn read_piece(
        &self,
        i: usize,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ClientError> {
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
        let result =
            match tokio::time::timeout(PIECE_TIMEOUT, self.read_piece_now(i, path, offset, len))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(ClientError::Status(tonic::Status::unavailable(format!(
                    "node {} did not answer a chunk read within {} s",
                    node.id,
                    PIECE_TIMEOUT.as_secs()
                )))),
            };
        if let Err(e) = &result
            && crate::retry::is_transient(e)
        {
            *node.failed_at.lock().expect("failed_at poisoned") = Some(std::time::Instant::now());
        }
        result
    }

    async fn read_piece_now(
        &self,
        i: usize,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ClientError> {
        let client = self.node(i).await?;
        let bytes = client
            .dataset(&self.info.unit_dataset)?
            .read_range(path, offset, len)
            .await?;
        if bytes.len() as u64 != len {
            return Err(ClientError::ShortRead {
                path: path.to_owned(),
                expected: len,
                got: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// Stripe `stripe` of `path`: its K data chunks, each from its node,
    /// all at once; parity chunks in place of those that fail, and the
    /// data rebuilt. Answers the data chunks and whether it rebuilt.
    async fn read_stripe(
        &self,
        path: &str,
        stripe: Stripe,
    ) -> Result<(Stripe, Vec<Vec<u8>>, bool), ClusterReadError> {
        let layout = self.layout;
        let (k, width) = (layout.k as usize, layout.width() as usize);
        let mut chunks: Vec<Option<Vec<u8>>> = vec![None; width];
        let mut failures = Vec::new();
        let (mut next, mut want) = (0usize, k);
        while want > 0 && next < width {
            let batch: Vec<usize> = (next..width.min(next + want)).collect();
            next += batch.len();
            let reads = batch.iter().map(|&j| {
                let node = layout.node_of(path, stripe.index, j as u32);
                async move {
                    let r = self
                        .read_piece(node, path, stripe.shard_offset, stripe.chunk_bytes)
                        .await;
                    (j, node, r)
                }
            });
            for (j, node, result) in join_all(reads).await {
                match result {
                    Ok(b) => {
                        chunks[j] = Some(b.to_vec());
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
        Ok((stripe, data, rebuilt))
    }

    /// Counts a read that needed parity.
    fn count_degraded(&self) {
        *self.degraded_reads.lock().expect("counter poisoned") += 1;
    }

    /// The whole object at `path`, checked against its CRC-32.
    pub async fn read(&self, path: &str) -> Result<Bytes, ClientError> {
        let entry = self.entry(path)?;
        let mut out = vec![0u8; entry.size as usize];
        let mut stripes = futures::stream::iter(self.layout.stripes(entry.size))
            .map(|s| self.read_stripe(path, s))
            .buffer_unordered(STRIPES_IN_FLIGHT);
        let mut rebuilt_any = false;
        while let Some(done) = stripes.next().await {
            let (stripe, data, rebuilt) = done?;
            rebuilt_any |= rebuilt;
            for (j, chunk) in data.iter().enumerate() {
                let (at, len) = stripe.data_of_chunk(j as u32);
                out[at as usize..(at + len) as usize].copy_from_slice(&chunk[..len as usize]);
            }
        }
        if rebuilt_any {
            self.count_degraded();
        }
        let got = crc32fast::hash(&out);
        if got != entry.crc32 {
            return Err(ClusterReadError::Checksum {
                path: path.to_owned(),
                got,
                want: entry.crc32,
            }
            .into());
        }
        Ok(Bytes::from(out))
    }

    /// `length` bytes of `path` from `offset`; past the end is
    /// OUT_OF_RANGE. Only the parts of the data chunks the range covers
    /// are read, each verified by its node against its block checksums
    /// (the object's CRC-32 covers whole objects only, so the whole
    /// object is read, and checked, when the range is all of it).
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
        let mut out = vec![0u8; length as usize];
        let covering = self
            .layout
            .stripes(entry.size)
            .filter(|s| s.object_offset < end && s.object_offset + s.data_bytes > offset);
        let mut parts = futures::stream::iter(covering)
            .map(|s| self.read_stripe_range(path, s, offset, end))
            .buffer_unordered(STRIPES_IN_FLIGHT);
        while let Some(part) = parts.next().await {
            let (at, bytes) = part?;
            let from = (at - offset) as usize;
            out[from..from + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(Bytes::from(out))
    }

    /// The bytes of `stripe` within `[lo, hi)` of the object, with their
    /// object offset: straight from the data chunks that hold them, or,
    /// when one of those reads fails, from the whole stripe rebuilt.
    async fn read_stripe_range(
        &self,
        path: &str,
        stripe: Stripe,
        lo: u64,
        hi: u64,
    ) -> Result<(u64, Vec<u8>), ClientError> {
        let from = lo.max(stripe.object_offset);
        let to = hi.min(stripe.object_offset + stripe.data_bytes);
        // (chunk, offset inside the chunk, length), in object order.
        let pieces: Vec<(u32, u64, u64)> = (0..self.layout.k)
            .filter_map(|j| {
                let (at, len) = stripe.data_of_chunk(j);
                let (a, b) = (at.max(from), (at + len).min(to));
                (a < b).then(|| (j, a - at, b - a))
            })
            .collect();
        let reads = pieces.iter().map(|&(j, within, len)| {
            let node = self.layout.node_of(path, stripe.index, j);
            self.read_piece(node, path, stripe.shard_offset + within, len)
        });
        let direct: Result<Vec<Bytes>, ClientError> = join_all(reads).await.into_iter().collect();
        if let Ok(pieces) = direct {
            return Ok((from, pieces.concat()));
        }
        let (stripe, data, rebuilt) = self.read_stripe(path, stripe).await?;
        if rebuilt {
            self.count_degraded();
        }
        let mut whole = Vec::with_capacity(stripe.data_bytes as usize);
        for (j, chunk) in data.iter().enumerate() {
            let (_, len) = stripe.data_of_chunk(j as u32);
            whole.extend_from_slice(&chunk[..len as usize]);
        }
        let start = (from - stripe.object_offset) as usize;
        Ok((from, whole[start..start + (to - from) as usize].to_vec()))
    }

    /// Whole objects, in the order asked, up to
    /// [`CLUSTER_OBJECTS_IN_FLIGHT`] at once; the first that fails is the
    /// answer.
    pub async fn read_objects(&self, paths: &[String]) -> Result<Vec<Bytes>, ClientError> {
        // The futures made first, not in a stream's closure: a closure
        // over `&String` there makes the future not provably `Send`.
        let reads: Vec<_> = paths.iter().map(|p| self.read(p)).collect();
        futures::stream::iter(reads)
            .buffered(CLUSTER_OBJECTS_IN_FLIGHT)
            .try_collect()
            .await
    }
}
