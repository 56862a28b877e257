//! `storagectl cat` and `storagectl stat`: one object's bytes, or where
//! they are.

use std::io::Write;

use anyhow::Context;
use futures::StreamExt;
use storaged_client::{Client, Dataset, SizedRange};

use super::{human, shown};

/// Window of an object one region read carries when reading into
/// regions, and windows in flight at once (the next ones are read while
/// one is written out).
const WINDOW_BYTES: u64 = 8 << 20;
const WINDOWS_IN_FLIGHT: usize = 4;

/// Bytes `[start, end)` of object `path` (of `object_size` bytes; the
/// range inside it) in order, as windows read into regions: shared memory
/// on the same host, this process's own over the TCP bulk channel from
/// another; several windows in flight.
pub(crate) fn region_windows(
    ds: &Dataset,
    path: &str,
    object_size: u64,
    start: u64,
    end: u64,
) -> impl futures::Stream<Item = Result<bytes::Bytes, storaged_client::ClientError>> + use<> {
    let ds = ds.clone();
    let path = path.to_owned();
    futures::stream::iter((start..end).step_by(WINDOW_BYTES as usize))
        .map(move |at| {
            let (ds, path) = (ds.clone(), path.clone());
            async move {
                let range = SizedRange {
                    path,
                    object_size,
                    offset: at,
                    length: WINDOW_BYTES.min(end - at),
                };
                let (mut results, _) = ds.read_ranges_sized(std::slice::from_ref(&range)).await?;
                results.pop().expect("one result per range")
            }
        })
        .buffered(WINDOWS_IN_FLIGHT)
}

/// Bytes `[offset, offset + length)` of an object (to its end without a
/// length) to stdout; into regions (`regions`) when the range lies in the
/// object (a range past its end goes over gRPC, whose error names it).
pub async fn cat(
    client: &Client,
    dataset: &str,
    path: &str,
    (offset, length): (u64, Option<u64>),
    regions: bool,
) -> anyhow::Result<()> {
    if let Some(cd) =
        storaged_client::cluster::ClusterDataset::open_if_cluster(client, dataset).await?
    {
        let bytes = cd.read(path).await?;
        let size = bytes.len() as u64;
        let end = match length {
            Some(l) => offset.checked_add(l),
            None => Some(size),
        };
        let Some(end) = end.filter(|&e| offset <= size && e <= size) else {
            anyhow::bail!(
                "OUT_OF_RANGE: {offset}+{} is past the end of {path:?} ({size} bytes)",
                length.unwrap_or(0)
            );
        };
        std::io::stdout()
            .lock()
            .write_all(&bytes[offset as usize..end as usize])
            .context("writing to stdout")?;
        return Ok(());
    }
    let ds = client.dataset(dataset)?;
    let mut windows = None;
    if regions {
        let size = ds.stat(path).await?.object.unwrap_or_default().size;
        let end = length.map_or(Some(size), |l| offset.checked_add(l));
        if let Some(end) = end.filter(|&e| offset <= size && e <= size) {
            windows = Some(region_windows(&ds, path, size, offset, end));
        }
    }
    let mut stream = match windows {
        Some(w) => w.boxed(),
        None => ds.read_stream(path, offset, length).boxed(),
    };
    // Raw bytes straight to fd 1: std's stdout is line-buffered and
    // would scan every chunk for newlines.
    let mut out = std::fs::File::from(
        std::os::fd::AsFd::as_fd(&std::io::stdout())
            .try_clone_to_owned()
            .context("duplicating stdout")?,
    );
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk?).context("writing to stdout")?;
    }
    Ok(())
}

/// An object's size, checksum and device extents.
pub async fn stat(client: &Client, dataset: &str, path: &str) -> anyhow::Result<()> {
    let st = client.dataset(dataset)?.stat(path).await?;
    let o = st.object.unwrap_or_default();
    outln!("path:            {}", shown(&o.path));
    outln!("size:            {} ({})", o.size, human(o.size));
    outln!("crc32:           {:08x}", o.crc32);
    outln!("logical offset:  {}", st.logical_offset);
    outln!("checksum block:  {}", st.checksum_block_bytes);
    outln!("extents:         object_offset device device_offset length");
    for e in st.extents {
        outln!(
            "                 {:>13} {:>6} {:>13} {:>6}",
            e.object_offset,
            e.device_index,
            e.device_offset,
            e.length
        );
    }
    Ok(())
}
