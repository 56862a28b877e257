//! `storagectl ingest` and `storagectl export`: a directory tree into a
//! new dataset, and a dataset back into a tree.

use super::*;

pub(crate) async fn ingest(
    client: &Client,
    dataset: &str,
    dir: &Path,
    options: IngestOptions,
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    start_ticking(&bar);
    let b2 = bar.clone();
    let ingested = client
        .ingest_dir_with(dataset, dir, options, move |p: IngestProgress| {
            b2.set_length(p.total_bytes);
            b2.set_position(p.sent_bytes);
            b2.set_message(format!("{}/{} objects", p.sent_objects, p.total_objects));
        })
        .await;
    bar.finish_and_clear();
    let ingested = ingested?;
    for s in &ingested.skipped {
        eprintln!("storagectl: warning: skipped unreadable {s}");
    }
    let info = ingested.info;
    if info.object_count == 0 {
        eprintln!(
            "storagectl: warning: {} holds no regular files{}: dataset {} is empty",
            dir.display(),
            if ingested.skipped.is_empty() {
                ""
            } else {
                " that could be read"
            },
            info.name
        );
    }
    outln!(
        "ingested {}: {} objects, {}, class {}{}",
        info.name,
        info.object_count,
        human(info.total_bytes),
        class_name(&info),
        if options.class.is_none() {
            " (the server's default for this pool)"
        } else {
            ""
        }
    );
    Ok(())
}

/// Where `export` reads objects from: the server's own dataset, or a
/// cluster dataset read from its nodes.
enum Source {
    Local {
        ds: Box<storaged_client::Dataset>,
        regions: bool,
    },
    Cluster(std::sync::Arc<storaged_client::cluster::ClusterDataset>),
}

impl Source {
    /// Object `path` (`size` bytes) as a stream of chunks.
    fn stream(
        &self,
        path: &str,
        size: u64,
    ) -> futures::stream::BoxStream<'static, Result<bytes::Bytes, storaged_client::ClientError>>
    {
        match self {
            Source::Local { ds, regions: true } => {
                crate::object::region_windows(ds, path, size, 0, size).boxed()
            }
            Source::Local { ds, regions: false } => ds.read_stream(path, 0, None).boxed(),
            Source::Cluster(cd) => {
                let (cd, path) = (std::sync::Arc::clone(cd), path.to_owned());
                futures::stream::once(async move { cd.read(&path).await }).boxed()
            }
        }
    }
}

pub(crate) async fn export(
    client: &Client,
    dataset: &str,
    dir: &Path,
    parallel: usize,
    regions: bool,
) -> anyhow::Result<()> {
    let (source, objects) =
        match storaged_client::cluster::ClusterDataset::open_if_cluster(client, dataset).await? {
            Some(cd) => {
                let objects: Vec<(String, u64, u32)> = cd
                    .objects()
                    .iter()
                    .map(|o| (o.path.clone(), o.size, o.crc32))
                    .collect();
                (Source::Cluster(std::sync::Arc::new(cd)), objects)
            }
            None => {
                let ds = client.dataset(dataset)?;
                let objects = ds
                    .list("")
                    .await?
                    .into_iter()
                    .map(|o| (o.path, o.size, o.crc32))
                    .collect();
                (
                    Source::Local {
                        ds: Box::new(ds),
                        regions,
                    },
                    objects,
                )
            }
        };
    let source = std::sync::Arc::new(source);
    // Every path checked before anything is written: the server's are
    // validated again, and names that cannot share one tree are reported.
    for (path, _, _) in &objects {
        storaged_proto::ObjectPath::new(path.as_str())
            .with_context(|| format!("server sent an unsafe path {path:?}"))?;
    }
    let clashes = safe_tree::conflicts(objects.iter().map(|(path, _, _)| path.as_str()));
    if !clashes.is_empty() {
        let list: Vec<String> = clashes
            .iter()
            .take(10)
            .map(|(file, under)| format!("{} and {}", shown(file), shown(under)))
            .collect();
        bail!(
            "dataset {dataset:?} cannot be written as one file tree: {} name(s) are both an object and a directory ({}); nothing was written",
            clashes.len(),
            list.join("; ")
        );
    }
    let root = std::sync::Arc::new(
        safe_tree::Root::open(dir).with_context(|| format!("opening {}", dir.display()))?,
    );
    let mut total = 0u64;
    let bar = bytes_bar("export", objects.iter().map(|(_, size, _)| size).sum());
    let results = futures::stream::iter(objects.into_iter().map(|(path, size, crc32)| {
        let source = std::sync::Arc::clone(&source);
        let root = std::sync::Arc::clone(&root);
        let target = dir.join(&path);
        async move {
            // Component by component under the root's descriptor, never
            // following a symlink (validated above: relative, no `..`).
            let rel = path.clone();
            let file = tokio::task::spawn_blocking(move || root.create_file(&rel))
                .await?
                .with_context(|| format!("creating {}", shown(&target.display().to_string())))?;
            let mut file = tokio::fs::File::from_std(file);
            let mut stream = source.stream(&path, size);
            let mut crc = crc32fast::Hasher::new();
            let mut n = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                crc.update(&chunk);
                n += chunk.len() as u64;
                tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                    .await
                    .with_context(|| format!("writing {}", target.display()))?;
            }
            tokio::io::AsyncWriteExt::flush(&mut file).await?;
            let crc = crc.finalize();
            if n != size || crc != crc32 {
                bail!(
                    "{path}: received {n} bytes with CRC {crc:08x}, expected {size} bytes with CRC {crc32:08x}"
                );
            }
            Ok::<u64, anyhow::Error>(n)
        }
    }))
    .buffer_unordered(parallel);
    let mut results = std::pin::pin!(results);
    let mut count = 0u64;
    while let Some(r) = results.next().await {
        let n = r?;
        bar.inc(n);
        total += n;
        count += 1;
    }
    bar.finish_and_clear();
    outln!(
        "exported {count} objects, {} to {}",
        human(total),
        dir.display()
    );
    Ok(())
}
