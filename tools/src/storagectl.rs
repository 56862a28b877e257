//! `storagectl`: the command-line client of storaged.
//!
//! Every subcommand is a thin layer over `storaged-client`. Errors print as
//! one line on stderr (`storagectl: error: NOT_FOUND: ...`) with exit code 1;
//! usage errors exit with 2 (clap's convention).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use storaged_client::region::RegionRead;
use storaged_client::{
    BatchItem, Client, IngestProgress, LoaderOptions, ObjectInfo, Plan, PlanSpec,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "storagectl",
    version,
    about = "Command-line client for storaged"
)]
struct Cli {
    /// storaged gRPC endpoint.
    #[arg(
        long,
        env = "STORAGED_URL",
        default_value = "http://127.0.0.1:7400",
        global = true
    )]
    server: String,
    /// `auto`: a TCP address on this host switches to the server's Unix
    /// socket when it has one (same pool), so loaders and `verify --via shm`
    /// use the zero-copy path. `as-given`: always the --server transport.
    #[arg(long, default_value = "auto", value_parser = ["auto", "as-given"], global = true)]
    transport: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Rebuild device OLD (an index or a path) onto the new device NEW from
    /// the other devices, while reads go on. Run it again with the same
    /// arguments to resume after a restart.
    Replace { old: String, new: PathBuf },
}

#[derive(Subcommand)]
enum Command {
    /// Upload a directory tree as a new dataset.
    Ingest {
        dataset: String,
        dir: PathBuf,
        /// Storage class: `stripe` (no redundancy) or `ec:K+M` (Reed-Solomon,
        /// any M devices may fail). Default: the server's, ec:(N-1)+1 on a
        /// pool of N >= 3 devices.
        #[arg(long)]
        class: Option<storaged_proto::model::StorageClass>,
    },
    /// Manage the pool's devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Read every unit of one dataset (or all), verify every checksum, and
    /// rewrite bad units of erasure-coded datasets from parity. Exits 1 if
    /// anything was unrecoverable.
    Scrub {
        dataset: Option<String>,
        /// Read rate in MiB/s (default: the server's scrub_rate_mib_s).
        #[arg(long)]
        rate_mib_s: Option<u64>,
    },
    /// List datasets, or the objects of one dataset.
    Ls {
        dataset: Option<String>,
        /// Only objects whose path starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Objects per request page.
        #[arg(long, default_value_t = 1000)]
        page_size: u32,
        /// Stop after this many objects.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Write an object (or a range of it) to stdout.
    Cat {
        dataset: String,
        path: String,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long)]
        length: Option<u64>,
    },
    /// Show an object's size, checksum and device extents.
    Stat { dataset: String, path: String },
    /// Write every object of a dataset under a directory.
    Export {
        dataset: String,
        dir: PathBuf,
        /// Objects downloaded at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
    /// Read every object of a dataset and check it against the whole-object
    /// CRC-32 recorded at ingest. Exits 1 naming the first bad object.
    Verify {
        dataset: String,
        /// Read path: grpc (ReadBatch, works anywhere) or shm (registered
        /// region, zero-copy; needs a same-host server: --server
        /// unix:///path/storaged.sock, or a loopback address with
        /// --transport auto).
        #[arg(long, default_value = "grpc")]
        via: String,
        /// Times to read the whole dataset.
        #[arg(long, default_value_t = 1)]
        passes: u32,
        /// Region size in MiB for --via shm.
        #[arg(long, default_value_t = 64)]
        region_mib: u64,
    },
    /// Read one shuffled epoch of a dataset the way a training job does
    /// (deterministic plan, prefetching loaders) and report samples/s and
    /// which path served the batches (shm on a unix:// server, else gRPC).
    Epoch {
        dataset: String,
        /// Data-loader workers (one loader each).
        #[arg(long, default_value_t = 4)]
        workers: u32,
        /// Samples per batch.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Read-ahead budget per worker, in MiB.
        #[arg(long, default_value_t = 64)]
        prefetch_mib: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// First epoch number.
        #[arg(long, default_value_t = 0)]
        epoch: u64,
        /// Epochs to run, one after another on the same connection.
        #[arg(long, default_value_t = 1)]
        epochs: u64,
        /// Read-ahead hints to storaged (gRPC path): on or off.
        #[arg(long, default_value = "on", value_parser = ["on", "off"])]
        hints: String,
    },
    /// Delete a dataset and free its space.
    Rm { dataset: String },
    /// Devices, capacity used and free, datasets.
    Status,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("storagectl: error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("storagectl: error: {msg}");
        std::process::exit(1);
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// RFC 3339 UTC time of a unix timestamp in milliseconds.
fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn class_name(d: &storaged_proto::pb::DatasetInfo) -> String {
    match storaged_proto::model::StorageClass::from_wire(
        d.storage_class,
        d.ec_data_units,
        d.ec_parity_units,
    ) {
        Ok(Some(c)) => c.to_string(),
        _ => "unknown".into(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = if cli.transport == "auto" {
        Client::connect_auto(&cli.server).await?
    } else {
        Client::connect(&cli.server).await?
    };
    match cli.command {
        Command::Ingest {
            dataset,
            dir,
            class,
        } => ingest(&client, &dataset, &dir, class).await,
        Command::Scrub {
            dataset,
            rate_mib_s,
        } => scrub(&client, dataset, rate_mib_s).await,
        Command::Device {
            command: DeviceCommand::Replace { old, new },
        } => replace_device(&client, &old, &new).await,
        Command::Ls { dataset: None, .. } => {
            let datasets = client.list_datasets().await?;
            println!(
                "{:<32} {:>10} {:>12} {:<8} CREATED",
                "NAME", "OBJECTS", "BYTES", "CLASS"
            );
            for d in datasets {
                println!(
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
        Command::Ls {
            dataset: Some(name),
            prefix,
            page_size,
            limit,
        } => {
            let ds = client.dataset(&name)?;
            let mut token = String::new();
            let mut shown = 0u64;
            let mut out = std::io::stdout().lock();
            loop {
                let (objects, next) = ds.list_page(&prefix, page_size, &token).await?;
                for o in objects {
                    if limit.is_some_and(|l| shown >= l) {
                        return Ok(());
                    }
                    writeln!(out, "{:>12}  {:08x}  {}", o.size, o.crc32, o.path)?;
                    shown += 1;
                }
                match next {
                    Some(t) => token = t,
                    None => return Ok(()),
                }
            }
        }
        Command::Cat {
            dataset,
            path,
            offset,
            length,
        } => {
            let ds = client.dataset(&dataset)?;
            let mut stream = std::pin::pin!(ds.read_stream(&path, offset, length));
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
        Command::Stat { dataset, path } => {
            let st = client.dataset(&dataset)?.stat(&path).await?;
            let o = st.object.unwrap_or_default();
            println!("path:            {}", o.path);
            println!("size:            {} ({})", o.size, human(o.size));
            println!("crc32:           {:08x}", o.crc32);
            println!("logical offset:  {}", st.logical_offset);
            println!("checksum block:  {}", st.checksum_block_bytes);
            println!("extents:         object_offset device device_offset length");
            for e in st.extents {
                println!(
                    "                 {:>13} {:>6} {:>13} {:>6}",
                    e.object_offset, e.device_index, e.device_offset, e.length
                );
            }
            Ok(())
        }
        Command::Export {
            dataset,
            dir,
            parallel,
        } => export(&client, &dataset, &dir, parallel.max(1)).await,
        Command::Verify {
            dataset,
            via,
            passes,
            region_mib,
        } => verify(&client, &dataset, &via, passes, region_mib).await,
        Command::Epoch {
            dataset,
            workers,
            batch,
            prefetch_mib,
            seed,
            epoch,
            epochs,
            hints,
        } => {
            let run = EpochRun {
                dataset,
                workers: workers.max(1),
                batch,
                prefetch_bytes: prefetch_mib << 20,
                seed,
                hints: hints == "on",
            };
            for e in epoch..epoch + epochs.max(1) {
                run_epoch(&client, &run, e).await?;
            }
            Ok(())
        }
        Command::Rm { dataset } => {
            let freed = client.delete_dataset(&dataset).await?;
            println!("deleted {dataset}; freed {}", human(freed));
            Ok(())
        }
        Command::Status => {
            let s = client.status().await?;
            println!("pool:        {}", s.pool_id);
            println!("version:     {}", s.version);
            println!("engine:      {}", s.engine);
            println!("stripe unit: {}", human(u64::from(s.stripe_unit_bytes)));
            println!(
                "capacity:    {}  used {}  free {}",
                human(s.capacity_bytes),
                human(s.used_bytes),
                human(s.free_bytes)
            );
            println!("used bytes:  {}", s.used_bytes);
            println!(
                "health:      {}",
                if s.degraded {
                    "DEGRADED (devices missing; see below)"
                } else {
                    "ok"
                }
            );
            if let Some(r) = &s.rebuild {
                println!(
                    "rebuild:     device {} onto {}: {} of {}{}",
                    r.device_index,
                    r.new_path,
                    human(r.bytes_done),
                    human(r.bytes_total),
                    if r.running {
                        ""
                    } else {
                        " (interrupted: run `storagectl device replace` again to resume)"
                    }
                );
            }
            println!(
                "scrub:       {} passes{}, {} checked, {} corrupt, {} repaired, {} unrecoverable",
                s.scrub_passes,
                if s.scrub_running { " (running)" } else { "" },
                human(s.scrub_bytes_checked),
                s.scrub_corrupt,
                s.scrub_repaired,
                s.scrub_unrecoverable
            );
            println!("ingests in progress: {}", s.ingests_in_progress);
            println!(
                "served:      grpc {} ({} copied)  shm {} ({} copied)",
                human(s.grpc_bytes_served),
                human(s.grpc_payload_bytes_copied),
                human(s.shm_bytes_served),
                human(s.shm_payload_bytes_copied)
            );
            println!(
                "scheduling:  {} device reads merged into neighbours",
                s.device_reads_merged
            );
            println!(
                "integrity:   {} checksum mismatches caught on read, {} superblock copies repaired",
                s.checksum_mismatches, s.superblocks_repaired
            );
            println!(
                "read-ahead:  {} hinted, {} read ahead, {} served ({}), {} skipped, {} failed, {} expired, {} held",
                s.hint_objects,
                s.read_ahead_objects,
                s.read_ahead_hits,
                human(s.read_ahead_hit_bytes),
                s.read_ahead_skipped,
                s.read_ahead_failed,
                s.read_ahead_expired,
                human(s.read_ahead_cache_bytes)
            );
            println!(
                "regions:     {} registered, {}",
                s.regions_registered,
                human(s.region_bytes_registered)
            );
            println!("devices:");
            for d in &s.devices {
                println!(
                    "  {:>3}  {:<40} {:<8} capacity {:>10}  used {:>10}  rebuilt {}",
                    d.index,
                    d.path,
                    d.state,
                    human(d.capacity_bytes),
                    human(d.used_bytes),
                    d.reconstructions
                );
            }
            println!("datasets: {}", s.datasets.len());
            for d in &s.datasets {
                println!(
                    "  {:<32} {:>10} objects {:>12}  {:<8} rebuilt {}{}",
                    d.name,
                    d.object_count,
                    human(d.total_bytes),
                    class_name(d),
                    d.reconstructions,
                    if d.health.is_empty() {
                        String::new()
                    } else {
                        format!("  {}", d.health)
                    }
                );
            }
            Ok(())
        }
    }
}

/// What `storagectl epoch` runs.
struct EpochRun {
    dataset: String,
    workers: u32,
    batch: usize,
    prefetch_bytes: u64,
    seed: u64,
    hints: bool,
}

async fn run_epoch(client: &Client, run: &EpochRun, epoch: u64) -> anyhow::Result<()> {
    let EpochRun {
        ref dataset,
        workers,
        batch,
        prefetch_bytes,
        seed,
        hints,
    } = *run;
    let ds = client.dataset(dataset)?;
    let listing: std::sync::Arc<[ObjectInfo]> = ds.list("").await?.into();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers.max(1) {
        let spec = PlanSpec {
            seed,
            epoch,
            worker,
            num_workers: workers.max(1),
            ..PlanSpec::default()
        };
        let plan = Plan::new(listing.clone(), spec, None)?;
        let options = LoaderOptions {
            hints,
            ..LoaderOptions::default()
        };
        let mut loader = ds.loader_with(plan, batch, prefetch_bytes, options)?;
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut bytes) = (0u64, 0u64);
            while let Some(b) = loader.next().await {
                for s in b?.samples {
                    samples += 1;
                    bytes += s.data.len() as u64;
                }
            }
            Ok::<_, anyhow::Error>((samples, bytes, loader.stats()))
        }));
    }
    let (mut samples, mut bytes, mut shm, mut grpc, mut hinted) = (0, 0, 0, 0, 0);
    for t in tasks {
        let (n, b, stats) = t.await??;
        samples += n;
        bytes += b;
        shm += stats.shm_batches;
        grpc += stats.grpc_batches;
        hinted += stats.hint_objects_accepted;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "epoch {epoch}: {samples} samples, {} in {secs:.2} s: {:.0} samples/s, {}/s; batches via shm {shm}, via grpc {grpc}; samples read ahead on hint {hinted}",
        human(bytes),
        samples as f64 / secs,
        human((bytes as f64 / secs) as u64)
    );
    Ok(())
}

/// Checks one object's bytes against its recorded CRC-32.
fn check_object(info: &ObjectInfo, data: &[u8]) -> anyhow::Result<()> {
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

fn check_crc(info: &ObjectInfo, crc: u32) -> anyhow::Result<()> {
    if crc != info.crc32 {
        bail!(
            "{}: CRC-32 {crc:08x}, recorded {:08x}",
            info.path,
            info.crc32
        );
    }
    Ok(())
}

async fn verify(
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
        "shm" => Some(client.register_region(region_mib.max(1) << 20).await?),
        other => bail!("--via {other:?}: expected grpc or shm"),
    };
    for pass in 1..=passes {
        match region.as_mut() {
            None => {
                let items = objects
                    .iter()
                    .map(|o| BatchItem {
                        path: o.path.clone(),
                        offset: 0,
                        length: None,
                    })
                    .collect();
                // In request order: any-order batches refuse items over
                // 64 MiB, and a shard is larger.
                let mut results = Box::pin(ds.read_batch(items, 64));
                while let Some(r) = results.next().await {
                    let r = r?;
                    let info = &objects[r.index as usize];
                    let data = r
                        .data
                        .map_err(|s| anyhow::anyhow!("{}: {}", info.path, s.message()))?;
                    check_object(info, &data)?;
                }
            }
            Some(region) => {
                let mut next = 0;
                while next < objects.len() {
                    let first = &objects[next];
                    if region.span(&RegionRead::whole(first.path.clone(), first.size))
                        > region.len() as u64
                    {
                        verify_in_pieces(&ds, region, first).await?;
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
                    }
                    next += reads.len();
                }
            }
        }
        println!(
            "pass {pass}: {} objects, {} verified via {via}",
            objects.len(),
            human(total)
        );
    }
    Ok(())
}

/// Verifies an object larger than the region, a region-full at a time.
async fn verify_in_pieces(
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

/// Shows a progress bar for a server-side job's event stream until it
/// ends; `split` turns an event into progress `Err((done, total))` or the
/// final report `Ok(Some(report))`. Returns the last report.
async fn follow<E, R>(
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
    bar.enable_steady_tick(Duration::from_millis(200));
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

async fn replace_device(client: &Client, old: &str, new: &Path) -> anyhow::Result<()> {
    use storaged_proto::pb::replace_device_event::Event;
    let new = std::path::absolute(new).with_context(|| format!("resolving {}", new.display()))?;
    let mut stream = client
        .raw()
        .replace_device(storaged_proto::pb::ReplaceDeviceRequest {
            old: old.to_owned(),
            new_path: new.display().to_string(),
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
    println!(
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
    Ok(())
}

async fn scrub(
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
    println!(
        "scrubbed {} datasets, {}: {} units checked, {} corrupt, {} repaired, {} unrecoverable, {} on missing devices",
        r.datasets,
        human(r.bytes_checked),
        r.units_checked,
        r.corrupt,
        r.repaired,
        r.unrecoverable,
        r.missing
    );
    for p in &r.problems {
        println!("  {p}");
    }
    if r.unrecoverable > 0 {
        bail!("{} units could not be repaired", r.unrecoverable);
    }
    Ok(())
}

async fn ingest(
    client: &Client,
    dataset: &str,
    dir: &Path,
    class: Option<storaged_proto::model::StorageClass>,
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let b2 = bar.clone();
    let info = client
        .ingest_dir_as(dataset, dir, class, move |p: IngestProgress| {
            b2.set_length(p.total_bytes);
            b2.set_position(p.sent_bytes);
            b2.set_message(format!("{}/{} objects", p.sent_objects, p.total_objects));
        })
        .await;
    bar.finish_and_clear();
    let info = info?;
    println!(
        "ingested {}: {} objects, {}, class {}{}",
        info.name,
        info.object_count,
        human(info.total_bytes),
        class_name(&info),
        if class.is_none() {
            " (the server's default for this pool)"
        } else {
            ""
        }
    );
    Ok(())
}

async fn export(client: &Client, dataset: &str, dir: &Path, parallel: usize) -> anyhow::Result<()> {
    let ds = client.dataset(dataset)?;
    let objects = ds.list("").await?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut total = 0u64;
    let results = futures::stream::iter(objects.into_iter().map(|o| {
        let ds = ds.clone();
        // Paths were validated by the server (relative, no `..`), so the
        // join cannot escape `dir`; check again rather than trust it.
        let rel = storaged_proto::ObjectPath::new(o.path.as_str());
        let target = dir.join(&o.path);
        async move {
            rel.with_context(|| format!("server sent an unsafe path {:?}", o.path))?;
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&target)
                .await
                .with_context(|| format!("creating {}", target.display()))?;
            let mut stream = std::pin::pin!(ds.read_stream(&o.path, 0, None));
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
        total += r?;
        count += 1;
    }
    println!(
        "exported {count} objects, {} to {}",
        human(total),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_time_and_sizes() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(human(5), "5 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
