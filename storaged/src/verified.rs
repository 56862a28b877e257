//! Bytes that passed their checksums: the only bytes the store hands out.
//!
//! "Every byte served is verified" is a rule the type system keeps here, in
//! the spirit of mountpoint-s3's `ChecksummedBytes`: [`VerifiedBytes`] can
//! only be made by [`verify`], which checks every checksum block of the
//! bytes against the catalog's CRCs first, or from other verified bytes
//! (a slice, or a [`VerifiedCopy`] of several; an empty one is vacuously
//! verified). The store's read paths return them, so a path that forgot
//! to verify does not compile; the service turns them into plain `Bytes`
//! at the edge, when they go on the wire.
//!
//! Bytes that land in a client's memory (`ReadInto`) are checked in place
//! with [`check`]; they never become `Bytes` of ours.

use bytes::Bytes;

/// Object bytes every checksum block of which matched. See the module
/// docs for how they come to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedBytes(Bytes);

/// A checksum block that did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Object offset of the block.
    pub object_offset: u64,
    pub expected: u32,
    pub actual: u32,
}

/// Why bytes could not be verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyError {
    Mismatch(Mismatch),
    /// The record has no CRC for this block (a damaged catalog record).
    NoChecksum {
        block: usize,
    },
}

/// What the bytes of one window are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Blocks<'a> {
    /// Checksum block size of the dataset.
    pub block_bytes: u64,
    /// The object's size (its last block is short).
    pub object_bytes: u64,
    /// CRC-32 of each block, in object order.
    pub crcs: &'a [u32],
}

/// Checks every checksum block of object bytes `[w_start, w_end)`
/// (`w_start` block-aligned) that lie in `pieces` back to back (a block
/// may straddle two pieces).
pub fn check(
    pieces: &[&[u8]],
    (w_start, w_end): (u64, u64),
    blocks: Blocks<'_>,
) -> Result<(), VerifyError> {
    let block = blocks.block_bytes;
    debug_assert_eq!(w_start % block, 0);
    let mut piece_i = 0usize;
    let mut piece_pos = 0u64; // window offset where pieces[piece_i] starts
    let mut b = w_start;
    while b < w_end {
        let b_end = (b + block).min(blocks.object_bytes);
        let idx = (b / block) as usize;
        let expected = *blocks
            .crcs
            .get(idx)
            .ok_or(VerifyError::NoChecksum { block: idx })?;
        let mut h = crc32fast::Hasher::new();
        let mut at = b - w_start;
        let stop = b_end - w_start;
        while at < stop {
            while at >= piece_pos + pieces[piece_i].len() as u64 {
                piece_pos += pieces[piece_i].len() as u64;
                piece_i += 1;
            }
            let piece = pieces[piece_i];
            let in_piece = (at - piece_pos) as usize;
            let take = ((piece_pos + piece.len() as u64).min(stop) - at) as usize;
            h.update(&piece[in_piece..in_piece + take]);
            at += take as u64;
        }
        let actual = h.finalize();
        if actual != expected {
            return Err(VerifyError::Mismatch(Mismatch {
                object_offset: b,
                expected,
                actual,
            }));
        }
        b = b_end;
    }
    Ok(())
}

/// Checks `pieces` (object bytes from `w_start` on, back to back) as
/// [`check`] does and, if every block matches, hands them back verified.
pub fn verify(
    pieces: Vec<Bytes>,
    window: (u64, u64),
    blocks: Blocks<'_>,
) -> Result<Vec<VerifiedBytes>, VerifyError> {
    let views: Vec<&[u8]> = pieces.iter().map(|b| b.as_ref()).collect();
    check(&views, window, blocks)?;
    Ok(pieces.into_iter().map(VerifiedBytes).collect())
}

impl VerifiedBytes {
    /// No bytes (nothing to check).
    pub fn empty() -> Self {
        Self(Bytes::new())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A part of verified bytes, without copying.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        Self(self.0.slice(range))
    }

    /// The bytes, for the wire.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

/// Verified bytes copied into one buffer as they come (so the buffers they
/// came in can go back before the next arrive); only verified bytes go in.
#[derive(Debug, Default)]
pub struct VerifiedCopy(Vec<u8>);

impl VerifiedCopy {
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    pub fn push(&mut self, part: &VerifiedBytes) {
        self.0.extend_from_slice(&part.0);
    }

    /// The copy, wrapped by `own` (which accounts for its memory).
    pub fn finish<O>(self, own: impl FnOnce(Vec<u8>) -> O) -> VerifiedBytes
    where
        O: AsRef<[u8]> + Send + 'static,
    {
        VerifiedBytes(Bytes::from_owner(own(self.0)))
    }
}

impl std::ops::Deref for VerifiedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for VerifiedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crcs(data: &[u8], block: usize) -> Vec<u32> {
        data.chunks(block).map(crc32fast::hash).collect()
    }

    /// Guards against verification that skips a block, misreads a block
    /// straddling two pieces, or hands out bytes that failed.
    #[test]
    fn every_block_is_checked_across_pieces() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let sums = crcs(&data, 4096);
        let blocks = Blocks {
            block_bytes: 4096,
            object_bytes: data.len() as u64,
            crcs: &sums,
        };
        // Pieces that cut blocks anywhere.
        let pieces = vec![
            Bytes::copy_from_slice(&data[..3000]),
            Bytes::copy_from_slice(&data[3000..9000]),
            Bytes::copy_from_slice(&data[9000..]),
        ];
        let v = verify(pieces.clone(), (0, data.len() as u64), blocks).unwrap();
        let joined: Vec<u8> = v.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(joined, data);
        for flip in [0usize, 2999, 3000, 4096, 8191, 9999] {
            let mut bad = data.clone();
            bad[flip] ^= 1;
            let pieces = vec![
                Bytes::copy_from_slice(&bad[..3000]),
                Bytes::copy_from_slice(&bad[3000..]),
            ];
            match verify(pieces, (0, data.len() as u64), blocks) {
                Err(VerifyError::Mismatch(m)) => {
                    assert_eq!(m.object_offset, (flip as u64 / 4096) * 4096, "flip {flip}");
                }
                other => panic!("flip {flip}: {other:?}"),
            }
        }
        // A window from the second block on.
        let v = verify(
            vec![Bytes::copy_from_slice(&data[4096..])],
            (4096, data.len() as u64),
            blocks,
        )
        .unwrap();
        assert_eq!(&v[0][..], &data[4096..]);
        let short = Blocks {
            crcs: &sums[..1],
            ..blocks
        };
        assert_eq!(
            check(&[&data[..]], (0, data.len() as u64), short),
            Err(VerifyError::NoChecksum { block: 1 })
        );
        let mut copy = VerifiedCopy::with_capacity(100);
        for part in &v {
            copy.push(part);
        }
        let c = copy.finish(|b| b);
        assert_eq!(&c[..], &data[4096..]);
        assert_eq!(&c.slice(1..3)[..], &data[4097..4099]);
    }
}
