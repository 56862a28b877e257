//! `storagectl scrub` and `storagectl device replace`: server-side jobs
//! followed with a progress bar until their report.

use super::*;

/// Shows a progress bar for a server-side job until it ends, and returns
/// its report.
pub(crate) async fn follow<R: Send + 'static>(
    job: storaged_client::admin::Job<R>,
    label: &str,
) -> anyhow::Result<R> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {label} [{{elapsed_precise}}] {{wide_bar}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    start_ticking(&bar);
    let report = job
        .report(|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .await;
    bar.finish_and_clear();
    Ok(report?)
}

pub(crate) async fn replace_device(
    client: &Client,
    old: &str,
    new: &Path,
    allow_healthy: bool,
    overwrite: bool,
) -> anyhow::Result<()> {
    let new = std::path::absolute(new).with_context(|| format!("resolving {}", new.display()))?;
    // The old device's path, to say what becomes of it.
    let old_path = client.status().await.ok().and_then(|s| {
        s.devices
            .into_iter()
            .find(|d| d.index.to_string() == old || d.path == old)
            .map(|d| d.path)
    });
    let job = client
        .replace_device(
            old,
            &new.display().to_string(),
            storaged_client::admin::ReplaceOptions {
                allow_healthy,
                overwrite,
            },
        )
        .await?;
    let r = follow(job, "rebuild").await?;
    outln!(
        "device {old} replaced by {}{}: {} units ({}) rebuilt in {:.1} s, {} units lost, {} of stripe datasets lost",
        new.display(),
        if r.resumed { " (resumed)" } else { "" },
        r.units_rebuilt,
        human(r.bytes_rebuilt),
        r.seconds,
        r.units_lost,
        human(r.stripe_bytes_lost)
    );
    if r.units_lost > 0 {
        bail!("{} units could not be rebuilt", r.units_lost);
    }
    if let Some(p) = old_path.filter(|p| Path::new(p) != new && Path::new(p).exists()) {
        outln!(
            "{p} is no longer part of the pool and was left as it was: remove it, or reuse it as a new device (storaged then needs --force, since it still holds this pool's superblock)"
        );
    }
    Ok(())
}

pub(crate) async fn scrub(
    client: &Client,
    dataset: Option<String>,
    rate_mib_s: Option<u64>,
) -> anyhow::Result<()> {
    let job = client
        .scrub(dataset.as_deref(), rate_mib_s.unwrap_or(0))
        .await?;
    let r = follow(job, "scrub").await?;
    outln!(
        "scrubbed {} datasets, {}: {} units checked, {} corrupt, {} repaired, {} unrecoverable, {} on missing devices; rows: {} corrupt, {} repaired",
        r.datasets,
        human(r.bytes_checked),
        r.units_checked,
        r.corrupt,
        r.repaired,
        r.unrecoverable,
        r.missing,
        r.rows_corrupt,
        r.rows_repaired
    );
    for p in &r.problems {
        outln!("  {p}");
    }
    if r.unrecoverable > 0 {
        bail!("{} units could not be repaired", r.unrecoverable);
    }
    Ok(())
}
