//! `storagectl verify`: every object of a dataset read back and checked
//! against its whole-object CRC-32, over gRPC, into a shared-memory region,
//! or into a region of this process over the TCP bulk channel.

use super::*;

/// Checks one object's bytes against its recorded CRC-32.
pub(crate) fn check_object(info: &ObjectInfo, data: &[u8]) -> anyhow::Result<()> {
    if data.len() as u64 != info.size {
        bail!(
            "{}: read {} bytes, the object has {}",
            info.path,
            data.len(),
            info.size
        );
    }
    check_crc(info, crc32fast::hash(data))
}

pub(crate) fn check_crc(info: &ObjectInfo, crc: u32) -> anyhow::Result<()> {
    if crc != info.crc32 {
        bail!(
            "{}: CRC-32 {crc:08x}, recorded {:08x}",
            info.path,
            info.crc32
        );
    }
    Ok(())
}

pub(crate) async fn verify(
    client: &Client,
    dataset: &str,
    via: &str,
    passes: u32,
    region_mib: u64,
) -> anyhow::Result<()> {
    let ds = client.dataset(dataset)?;
    let objects = ds.list("").await?;
    let total: u64 = objects.iter().map(|o| o.size).sum();
    let mut region = match via {
        "grpc" => None,
        "shm" | "bulk" => {
            let region = client.register_region(region_mib.max(1) << 20).await?;
            match (via, region.is_shared()) {
                ("shm", false) => bail!(
                    "--via shm needs storaged on this host (its Unix socket); this connection is TCP{}: use --via bulk or grpc",
                    client
                        .not_local_because()
                        .map(|why| format!(" ({why})"))
                        .unwrap_or_default()
                ),
                ("bulk", true) => bail!(
                    "--via bulk is for a storaged on another host (TCP); this connection is on its Unix socket: use --via shm, or --transport bulk"
                ),
                _ => Some(region),
            }
        }
        other => bail!("--via {other:?}: expected grpc, shm or bulk"),
    };
    for pass in 1..=passes {
        let bar = bytes_bar(&format!("verify pass {pass}"), total);
        match region.as_mut() {
            None => verify_grpc(&ds, &objects, &bar).await?,
            Some(region) => {
                let mut next = 0;
                while next < objects.len() {
                    let first = &objects[next];
                    if region.span(&RegionRead::whole(first.path.clone(), first.size))
                        > region.len() as u64
                    {
                        verify_in_pieces(&ds, region, first).await?;
                        bar.inc(first.size);
                        next += 1;
                        continue;
                    }
                    // As many whole objects as fit in the region.
                    let mut reads = Vec::new();
                    let mut used = 0;
                    while let Some(o) = objects.get(next + reads.len()) {
                        let read = RegionRead::whole(o.path.clone(), o.size);
                        let span = region.span(&read);
                        if used + span > region.len() as u64 {
                            break;
                        }
                        used += span;
                        reads.push(read);
                    }
                    let batch = ds.read_into(region, &reads).await?;
                    for (k, info) in objects[next..next + reads.len()].iter().enumerate() {
                        let data = batch
                            .get(k)
                            .map_err(|s| anyhow::anyhow!("{}: {}", info.path, s.message()))?;
                        check_object(info, data)?;
                        bar.inc(info.size);
                    }
                    next += reads.len();
                }
            }
        }
        bar.finish_and_clear();
        outln!(
            "pass {pass}: {} objects, {} verified via {via}",
            objects.len(),
            human(total)
        );
    }
    Ok(())
}

/// Objects per in-order `ReadBatch` of `verify --via grpc`, and the bytes
/// they may add up to: each item arrives whole, so the batches stay small.
const VERIFY_BATCH_ITEMS_MAX: usize = 1024;
const VERIFY_BATCH_BYTES_MAX: u64 = 256 << 20;

/// Verifies `objects` over gRPC with bounded memory: small objects in
/// in-order batches, objects over the any-order item limit streamed in
/// pieces and hashed as they arrive (a shard is never held whole).
pub(crate) async fn verify_grpc(
    ds: &storaged_client::Dataset,
    objects: &[ObjectInfo],
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let streamed = |o: &ObjectInfo| o.size > storaged_proto::model::BATCH_ANY_ORDER_ITEM_BYTES_MAX;
    let mut next = 0;
    while next < objects.len() {
        if streamed(&objects[next]) {
            let info = &objects[next];
            let mut stream = std::pin::pin!(ds.read_stream(&info.path, 0, None));
            let mut hasher = crc32fast::Hasher::new();
            let mut n = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.with_context(|| info.path.clone())?;
                hasher.update(&chunk);
                n += chunk.len() as u64;
            }
            if n != info.size {
                bail!(
                    "{}: read {n} bytes, the object has {}",
                    info.path,
                    info.size
                );
            }
            check_crc(info, hasher.finalize())?;
            bar.inc(info.size);
            next += 1;
            continue;
        }
        let mut end = next;
        let mut bytes = 0u64;
        while end < objects.len()
            && !streamed(&objects[end])
            && end - next < VERIFY_BATCH_ITEMS_MAX
            && (end == next || bytes + objects[end].size <= VERIFY_BATCH_BYTES_MAX)
        {
            bytes += objects[end].size;
            end += 1;
        }
        let items = objects[next..end]
            .iter()
            .map(|o| BatchItem {
                path: o.path.clone(),
                offset: 0,
                length: None,
            })
            .collect();
        let mut results = Box::pin(ds.read_batch(items, 64));
        while let Some(r) = results.next().await {
            let r = r?;
            let info = &objects[next + r.index as usize];
            let data = r
                .data
                .map_err(|s| anyhow::anyhow!("{}: {}", info.path, s.message()))?;
            check_object(info, &data)?;
            bar.inc(info.size);
        }
        next = end;
    }
    Ok(())
}

/// Verifies an object larger than the region, a region-full at a time.
pub(crate) async fn verify_in_pieces(
    ds: &storaged_client::Dataset,
    region: &mut storaged_client::Region,
    info: &ObjectInfo,
) -> anyhow::Result<()> {
    // Whole checksum blocks per piece, so each piece's span is its length.
    let block = region.checksum_block_bytes();
    let piece = (region.len() as u64 / block) * block;
    if piece == 0 {
        bail!("the region is smaller than one 32 KiB checksum block");
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut offset = 0;
    while offset < info.size {
        let read = RegionRead {
            path: info.path.clone(),
            offset,
            length: Some(piece.min(info.size - offset)),
            object_size: info.size,
        };
        let batch = ds.read_into(region, std::slice::from_ref(&read)).await?;
        let data = batch
            .get(0)
            .map_err(|s| anyhow::anyhow!("{}: {}", info.path, s.message()))?;
        hasher.update(data);
        offset += data.len() as u64;
    }
    check_crc(info, hasher.finalize())
}
