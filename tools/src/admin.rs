//! `storagectl scrub` and `storagectl device replace`: server-side jobs
//! followed with a progress bar until their report.

use super::*;

/// Shows a progress bar for a server-side job's event stream until it
/// ends; `split` turns an event into progress `Err((done, total))` or the
/// final report `Ok(Some(report))`. Returns the last report.
pub(crate) async fn follow<E, R>(
    stream: &mut tonic::Streaming<E>,
    label: &str,
    split: impl Fn(E) -> Result<Option<R>, (u64, u64)>,
) -> anyhow::Result<Option<R>> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {label} [{{elapsed_precise}}] {{wide_bar}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    start_ticking(&bar);
    let mut report = None;
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(s) => {
                bar.finish_and_clear();
                return Err(storaged_client::ClientError::from(s).into());
            }
        };
        match split(ev) {
            Err((done, total)) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Ok(Some(r)) => report = Some(r),
            Ok(None) => {}
        }
    }
    bar.finish_and_clear();
    Ok(report)
}

pub(crate) async fn replace_device(
    client: &Client,
    old: &str,
    new: &Path,
    allow_healthy: bool,
    overwrite: bool,
) -> anyhow::Result<()> {
    use storaged_proto::pb::replace_device_event::Event;
    let new = std::path::absolute(new).with_context(|| format!("resolving {}", new.display()))?;
    // The old device's path, to say what becomes of it.
    let old_path = client.status().await.ok().and_then(|s| {
        s.devices
            .into_iter()
            .find(|d| d.index.to_string() == old || d.path == old)
            .map(|d| d.path)
    });
    let mut stream = client
        .raw()
        .replace_device(storaged_proto::pb::ReplaceDeviceRequest {
            old: old.to_owned(),
            new_path: new.display().to_string(),
            allow_healthy,
            overwrite,
        })
        .await
        .map_err(storaged_client::ClientError::from)?
        .into_inner();
    let report = follow(&mut stream, "rebuild", |ev| match ev.event {
        Some(Event::Progress(p)) => Err((p.bytes_done, p.bytes_total)),
        Some(Event::Report(r)) => Ok(Some(r)),
        None => Ok(None),
    })
    .await?;
    let r = report.context("the server ended the replacement without a report")?;
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
    use storaged_proto::pb::scrub_event::Event;
    let mut stream = client
        .raw()
        .scrub(storaged_proto::pb::ScrubRequest {
            dataset: dataset.unwrap_or_default(),
            rate_mib_s: rate_mib_s.unwrap_or(0),
        })
        .await
        .map_err(storaged_client::ClientError::from)?
        .into_inner();
    let report = follow(&mut stream, "scrub", |ev| match ev.event {
        Some(Event::Progress(p)) => Err((p.bytes_done, p.bytes_total)),
        Some(Event::Report(r)) => Ok(Some(r)),
        None => Ok(None),
    })
    .await?;
    let r = report.context("the server ended the scrub without a report")?;
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
