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

pub(crate) async fn export(
    client: &Client,
    dataset: &str,
    dir: &Path,
    parallel: usize,
    regions: bool,
) -> anyhow::Result<()> {
    let ds = client.dataset(dataset)?;
    let objects = ds.list("").await?;
    // Every path checked before anything is written: the server's are
    // validated again, and names that cannot share one tree are reported.
    for o in &objects {
        storaged_proto::ObjectPath::new(o.path.as_str())
            .with_context(|| format!("server sent an unsafe path {:?}", o.path))?;
    }
    let clashes = safe_tree::conflicts(objects.iter().map(|o| o.path.as_str()));
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
    let bar = bytes_bar("export", objects.iter().map(|o| o.size).sum());
    let results = futures::stream::iter(objects.into_iter().map(|o| {
        let ds = ds.clone();
        let root = std::sync::Arc::clone(&root);
        let target = dir.join(&o.path);
        async move {
            // Component by component under the root's descriptor, never
            // following a symlink (validated above: relative, no `..`).
            let rel = o.path.clone();
            let file = tokio::task::spawn_blocking(move || root.create_file(&rel))
                .await?
                .with_context(|| format!("creating {}", shown(&target.display().to_string())))?;
            let mut file = tokio::fs::File::from_std(file);
            let mut stream = if regions {
                crate::object::region_windows(&ds, &o.path, o.size, 0, o.size).boxed()
            } else {
                ds.read_stream(&o.path, 0, None).boxed()
            };
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
            if n != o.size || crc != o.crc32 {
                bail!(
                    "{}: received {n} bytes with CRC {crc:08x}, expected {} bytes with CRC {:08x}",
                    o.path,
                    o.size,
                    o.crc32
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
