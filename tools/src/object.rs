//! `storagectl cat` and `storagectl stat`: one object's bytes, or where
//! they are.

use std::io::Write;

use anyhow::Context;
use futures::StreamExt;
use storaged_client::Client;

use super::{human, shown};

/// Bytes `[offset, offset + length)` of an object (to its end without a
/// length) to stdout.
pub async fn cat(
    client: &Client,
    dataset: &str,
    path: &str,
    offset: u64,
    length: Option<u64>,
) -> anyhow::Result<()> {
    let ds = client.dataset(dataset)?;
    let mut stream = std::pin::pin!(ds.read_stream(path, offset, length));
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
