//! `storagectl ls`: the datasets, or one dataset's objects page by page
//! (a listing of millions streams, never held whole).

use std::io::Write;

use storaged_client::Client;

use super::{class_name, human, rfc3339, shown};

/// Every dataset the caller may see, one line each.
pub async fn datasets(client: &Client) -> anyhow::Result<()> {
    let datasets = client.list_datasets().await?;
    outln!(
        "{:<32} {:>10} {:>12} {:<8} CREATED",
        "NAME",
        "OBJECTS",
        "BYTES",
        "CLASS"
    );
    for d in datasets {
        outln!(
            "{:<32} {:>10} {:>12} {:<8} {}",
            d.name,
            d.object_count,
            human(d.total_bytes),
            class_name(&d),
            rfc3339(d.created_unix_ms)
        );
    }
    Ok(())
}

/// The objects of dataset `name` under `prefix`, at most `limit`.
pub async fn objects(
    client: &Client,
    name: &str,
    prefix: &str,
    page_size: u32,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    if let Some(cd) =
        storaged_client::cluster::ClusterDataset::open_if_cluster(client, name).await?
    {
        // A cluster dataset's listing is its manifest (ingest order).
        let mut objects: Vec<_> = cd
            .objects()
            .iter()
            .filter(|o| o.path.starts_with(prefix))
            .collect();
        objects.sort_by(|a, b| a.path.cmp(&b.path));
        let mut out = std::io::stdout().lock();
        writeln!(out, "{:>12}  {:<8}  PATH", "SIZE", "CRC32")?;
        for o in objects
            .iter()
            .take(limit.map_or(usize::MAX, |l| l as usize))
        {
            writeln!(out, "{:>12}  {:08x}  {}", o.size, o.crc32, shown(&o.path))?;
        }
        return Ok(());
    }
    let ds = client.dataset(name)?;
    let mut token = String::new();
    let mut listed = 0u64;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:>12}  {:<8}  PATH", "SIZE", "CRC32")?;
    loop {
        let (objects, next) = ds.list_page(prefix, page_size, &token).await?;
        for o in objects {
            if limit.is_some_and(|l| listed >= l) {
                return Ok(());
            }
            writeln!(out, "{:>12}  {:08x}  {}", o.size, o.crc32, shown(&o.path))?;
            listed += 1;
        }
        match next {
            Some(t) => token = t,
            None => return Ok(()),
        }
    }
}
