//! Where a cluster dataset's bytes live, computed the same way by the
//! node that ingests it and by every client that reads it, so no read
//! asks a metadata service (byte layout in docs/FORMAT.md, "Cluster
//! datasets").
//!
//! A cluster dataset of class `ec:K+M` is spread over K+M nodes. Each
//! object is cut into stripes of K data chunks (`chunk_bytes` each; the
//! last stripe's chunks are ceil(rest / K), zero-padded) and M parity
//! chunks, Reed-Solomon over the data chunks position by position. Chunk
//! j of stripe t of the object at path p goes to node
//! `(j + t + crc32(p)) mod (K+M)` of the dataset's node list, so every
//! node holds exactly one chunk of every stripe, and data and parity
//! rotate stripe by stripe: one large object streams from every node's
//! link, and small objects (one stripe) spread by their path. A node
//! keeps its chunks of an object back to back, in stripe order, as an
//! object of the same path in its unit dataset: stripe t's chunk is at
//! the same offset on every node ([`Stripe::shard_offset`]).
//!
//! Each unit dataset also holds the dataset's manifest at
//! [`MANIFEST_PATH`]: every object's path, size and CRC-32, so any one
//! surviving node gives the whole listing.

/// Where the manifest is kept in every unit dataset; user objects may not
/// live under its directory.
pub const MANIFEST_PATH: &str = ".storaged-cluster/manifest";
/// The directory of [`MANIFEST_PATH`].
pub const RESERVED_DIR: &str = ".storaged-cluster/";
/// Unit datasets are named `<UNIT_PREFIX><transaction id>`.
pub const UNIT_PREFIX: &str = "cluster.";

/// The shape of a cluster dataset's objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EcLayout {
    /// Data shards per object.
    pub k: u32,
    /// Parity shards per object.
    pub m: u32,
    /// Bytes of one chunk of a full stripe.
    pub chunk_bytes: u64,
}

/// One stripe of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stripe {
    /// Its number in the object, from 0.
    pub index: u64,
    /// Where the stripe begins in the object.
    pub object_offset: u64,
    /// Object bytes in the stripe (at most K chunks).
    pub data_bytes: u64,
    /// Each shard's chunk of this stripe: its length ...
    pub chunk_bytes: u64,
    /// ... and where it begins in the shard.
    pub shard_offset: u64,
}

impl EcLayout {
    /// Shards per object.
    pub fn width(&self) -> u32 {
        self.k + self.m
    }

    /// The bytes each node keeps of an object of `object_bytes` (one
    /// chunk of every stripe).
    pub fn shard_bytes(&self, object_bytes: u64) -> u64 {
        let k = u64::from(self.k);
        let stripe = k * self.chunk_bytes;
        let full = object_bytes / stripe;
        let rest = object_bytes % stripe;
        full * self.chunk_bytes + rest.div_ceil(k)
    }

    /// The object's stripes in order.
    pub fn stripes(&self, object_bytes: u64) -> impl Iterator<Item = Stripe> + use<> {
        let k = u64::from(self.k);
        let chunk = self.chunk_bytes;
        let mut object_offset = 0u64;
        let mut shard_offset = 0u64;
        let mut index = 0u64;
        std::iter::from_fn(move || {
            if object_offset >= object_bytes {
                return None;
            }
            let data_bytes = (object_bytes - object_offset).min(k * chunk);
            let chunk_bytes = data_bytes.div_ceil(k);
            let s = Stripe {
                index,
                object_offset,
                data_bytes,
                chunk_bytes,
                shard_offset,
            };
            object_offset += data_bytes;
            shard_offset += chunk_bytes;
            index += 1;
            Some(s)
        })
    }

    /// The index, in the dataset's node list, of the node holding chunk
    /// `chunk` (data `0..K`, parity `K..K+M`) of stripe `stripe` of the
    /// object at `path`.
    pub fn node_of(&self, path: &str, stripe: u64, chunk: u32) -> usize {
        let width = u64::from(self.width());
        let rotation = u64::from(crc32fast::hash(path.as_bytes()));
        ((u64::from(chunk) + stripe % width + rotation % width) % width) as usize
    }

    /// Which chunk of stripe `stripe` of `path` node `node` holds (the
    /// inverse of [`node_of`](Self::node_of)).
    pub fn chunk_on(&self, path: &str, stripe: u64, node: usize) -> u32 {
        let width = u64::from(self.width());
        let rotation = u64::from(crc32fast::hash(path.as_bytes()));
        ((node as u64 + 2 * width - stripe % width - rotation % width) % width) as u32
    }
}

impl Stripe {
    /// The object bytes chunk `j` of this stripe holds: (offset in the
    /// object, length); the rest of the chunk is padding.
    pub fn data_of_chunk(&self, j: u32) -> (u64, u64) {
        let start = u64::from(j) * self.chunk_bytes;
        let len = self.data_bytes.saturating_sub(start).min(self.chunk_bytes);
        (self.object_offset + start.min(self.data_bytes), len)
    }
}

/// One object of a cluster dataset, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub path: String,
    pub size: u64,
    pub crc32: u32,
}

/// Why a manifest could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("the cluster manifest is truncated")]
    Truncated,
    #[error("the cluster manifest has magic {0:?}, not SDCM")]
    Magic([u8; 4]),
    #[error("the cluster manifest is format {0} (this reads format 1)")]
    Format(u32),
    #[error("the cluster manifest fails its CRC")]
    Checksum,
    #[error("the cluster manifest holds a path that is not UTF-8")]
    Path,
}

const MANIFEST_MAGIC: &[u8; 4] = b"SDCM";

/// Encodes a manifest: "SDCM", format u32 (1), count u64, then per
/// object path length u16, path, size u64, CRC-32 u32, all little-endian,
/// and a CRC-32 of everything before it.
pub fn encode_manifest(entries: &[ManifestEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.iter().map(|e| e.path.len() + 14).sum::<usize>());
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&(e.path.len() as u16).to_le_bytes());
        out.extend_from_slice(e.path.as_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.crc32.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes what [`encode_manifest`] wrote.
pub fn decode_manifest(b: &[u8]) -> Result<Vec<ManifestEntry>, ManifestError> {
    if b.len() < 20 {
        return Err(ManifestError::Truncated);
    }
    let (body, tail) = b.split_at(b.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != tail {
        return Err(ManifestError::Checksum);
    }
    let magic: [u8; 4] = body[..4].try_into().map_err(|_| ManifestError::Truncated)?;
    if &magic != MANIFEST_MAGIC {
        return Err(ManifestError::Magic(magic));
    }
    let mut at = 4;
    let mut take = |n: usize| -> Result<&[u8], ManifestError> {
        let s = body.get(at..at + n).ok_or(ManifestError::Truncated)?;
        at += n;
        Ok(s)
    };
    let le64 = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
    let format = u32::from_le_bytes(take(4)?.try_into().unwrap_or([0; 4]));
    if format != 1 {
        return Err(ManifestError::Format(format));
    }
    let count = le64(take(8)?);
    // Each entry takes at least 14 bytes: a count beyond that is a lie.
    if count > (body.len() / 14) as u64 {
        return Err(ManifestError::Truncated);
    }
    let mut entries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = u16::from_le_bytes(take(2)?.try_into().unwrap_or([0; 2])) as usize;
        let path = std::str::from_utf8(take(len)?)
            .map_err(|_| ManifestError::Path)?
            .to_owned();
        let size = le64(take(8)?);
        let crc32 = u32::from_le_bytes(take(4)?.try_into().unwrap_or([0; 4]));
        entries.push(ManifestEntry { path, size, crc32 });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(k: u32, m: u32, chunk: u64) -> EcLayout {
        EcLayout {
            k,
            m,
            chunk_bytes: chunk,
        }
    }

    #[test]
    fn stripes_cover_the_object_once_and_fill_the_shards() {
        for l in [
            layout(2, 1, 4),
            layout(3, 2, 5),
            layout(1, 1, 8),
            layout(4, 2, 1),
        ] {
            for len in 0..100u64 {
                let mut covered = vec![0u8; len as usize];
                let mut shard_end = 0;
                for s in l.stripes(len) {
                    assert_eq!(s.shard_offset, shard_end);
                    shard_end += s.chunk_bytes;
                    for j in 0..l.k {
                        let (at, n) = s.data_of_chunk(j);
                        for b in at..at + n {
                            covered[b as usize] += 1;
                        }
                    }
                }
                assert!(covered.iter().all(|&c| c == 1), "{l:?} len {len}");
                assert_eq!(shard_end, l.shard_bytes(len), "{l:?} len {len}");
            }
        }
    }

    #[test]
    fn every_node_holds_one_chunk_of_every_stripe_and_parity_rotates() {
        let l = layout(2, 1, 1 << 20);
        let mut parity_on = [0; 3];
        for i in 0..300 {
            let path = format!("train/{i}.jpg");
            for stripe in 0..5 {
                let nodes: Vec<usize> = (0..3).map(|j| l.node_of(&path, stripe, j)).collect();
                let mut sorted = nodes.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, [0, 1, 2], "each chunk on its own node");
                for (j, &n) in nodes.iter().enumerate() {
                    assert_eq!(l.chunk_on(&path, stripe, n), j as u32);
                }
                parity_on[nodes[2]] += 1;
            }
        }
        assert!(
            parity_on.iter().all(|&n| n > 400),
            "parity spread: {parity_on:?}"
        );
        // One object's stripes put its parity on every node in turn.
        let one: Vec<usize> = (0..3).map(|t| l.node_of("big.tar", t, 2)).collect();
        let mut sorted = one.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2]);
    }

    #[test]
    fn manifests_round_trip_and_damage_is_named() {
        let entries = vec![
            ManifestEntry {
                path: "a/b".into(),
                size: 7,
                crc32: 1,
            },
            ManifestEntry {
                path: "c".into(),
                size: 0,
                crc32: 0,
            },
        ];
        let b = encode_manifest(&entries);
        assert_eq!(decode_manifest(&b).unwrap(), entries);
        assert_eq!(decode_manifest(&encode_manifest(&[])).unwrap(), []);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode_manifest(&bad).is_err(), "flip at {i} accepted");
        }
        assert_eq!(decode_manifest(&b[..10]), Err(ManifestError::Truncated));
    }
}
