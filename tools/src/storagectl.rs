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
use std::io::IsTerminal;
mod safe_tree;
use safe_tree::shown;
use storaged_client::region::RegionRead;
use storaged_client::{
    BatchItem, Client, ConnectOptions, IngestOptions, IngestProgress, LoaderOptions, ObjectInfo,
    Plan, PlanSpec,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` that fails with the write's error instead of panicking, so a
/// closed pipe (`storagectl ls | head`) ends the command quietly.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

// After `outln!`, which they use.
mod ls;
mod object;
mod rm;
mod status;

#[derive(Parser)]
#[command(
    name = "storagectl",
    version,
    about = "Command-line client for storaged"
)]
struct Cli {
    /// storaged's address: http://HOST:PORT, https://HOST:PORT (with --ca),
    /// or unix:///path/storaged.sock on the same host.
    #[arg(
        long,
        env = "STORAGED_URL",
        default_value = "http://127.0.0.1:7400",
        global = true
    )]
    server: String,
    /// `auto`: a loopback --server switches to the server's Unix socket
    /// when this process may use it (same pool), so `epoch` and `verify
    /// --via shm` take the zero-copy path; when it does not, commands that
    /// need it say why. `as-given`: always the --server transport (TCP for
    /// http://).
    #[arg(long, default_value = "auto", value_parser = ["auto", "as-given"], global = true)]
    transport: String,
    /// Bearer token for a storaged with tenants (`storagectl token new`).
    #[arg(long, env = "STORAGED_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Deadline of each call: `30s`, `5m`, `1h`, `500ms`; `0` for none.
    /// Default: 60s for calls that answer at once (status, ls, stat, rm,
    /// device), none for those that move or check data (ingest, cat,
    /// export, verify, epoch, scrub).
    #[arg(long, value_parser = parse_timeout, global = true)]
    timeout: Option<Duration>,
    /// For https:// servers: the CA certificate (PEM) that signed
    /// storaged's certificate.
    #[arg(long, env = "STORAGED_CA", global = true)]
    ca: Option<PathBuf>,
    /// This client's certificate (PEM), when storaged requires one.
    #[arg(long, env = "STORAGED_CERT", global = true)]
    cert: Option<PathBuf>,
    /// The key (PEM) of --cert.
    #[arg(long, env = "STORAGED_KEY", global = true)]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random token, and the line that grants it to a tenant
    /// in storaged's config (which stores only its SHA-256). Contacts no
    /// server.
    New {
        /// The tenant the config line is for.
        #[arg(long, default_value = "NAME")]
        tenant: String,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Rebuild device OLD (an index or a path) onto the new device NEW from
    /// the other devices, while reads go on. Run it again with the same
    /// arguments to resume after a restart.
    Replace {
        /// The device to replace: its index in the pool (see `status`) or
        /// its path.
        old: String,
        /// The new device: a block device, or an existing regular file at
        /// least the pool's device size (`truncate -s SIZE FILE`). It must
        /// be blank.
        new: PathBuf,
        /// Replace a device that is present and healthy (its share is
        /// unreadable until the rebuild ends).
        #[arg(long)]
        healthy: bool,
        /// Overwrite a new device that holds data (a file system, another
        /// pool).
        #[arg(long)]
        overwrite: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Upload a directory tree as a new dataset.
    Ingest {
        /// Name of the new dataset: 1-128 bytes of [A-Za-z0-9._-].
        dataset: String,
        /// Directory whose regular files become the dataset's objects
        /// (paths relative to it; symlinks to files are followed).
        dir: PathBuf,
        /// Storage class: `stripe` (no redundancy) or `ec:K+M` (Reed-Solomon,
        /// any M devices may fail). [default: the server's, ec:(N-1)+1 on a
        /// pool of N >= 3 devices]
        #[arg(long)]
        class: Option<storaged_proto::model::StorageClass>,
        /// Leave out files and directories that cannot be read (each is
        /// named on stderr) instead of failing the ingest.
        #[arg(long)]
        skip_unreadable: bool,
    },
    /// Manage the pool's devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Make credentials for storaged's tenants.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Read every unit of one dataset (or all), verify every checksum, and
    /// rewrite bad units of erasure-coded datasets from parity. Exits 1 if
    /// anything was unrecoverable.
    Scrub {
        /// The dataset to scrub. [default: every dataset]
        dataset: Option<String>,
        /// Read rate in MiB/s. [default: the server's scrub_rate_mib_s, 64]
        #[arg(long)]
        rate_mib_s: Option<u64>,
    },
    /// List datasets, or the objects of one dataset.
    Ls {
        /// List this dataset's objects (size, CRC-32, path). [default: list
        /// the datasets]
        dataset: Option<String>,
        /// Only objects whose path starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Objects per request page.
        #[arg(long, default_value_t = 1000)]
        page_size: u32,
        /// Stop after this many objects. [default: no limit]
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Write an object (or a range of it) to stdout.
    Cat {
        /// The dataset.
        dataset: String,
        /// The object's path in the dataset (as `ls DATASET` shows it).
        path: String,
        /// First byte to write.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to write. [default: to the end of the object]
        #[arg(long)]
        length: Option<u64>,
    },
    /// Show an object's size, checksum and device extents.
    Stat {
        /// The dataset.
        dataset: String,
        /// The object's path in the dataset.
        path: String,
    },
    /// Write every object of a dataset under a directory.
    Export {
        /// The dataset.
        dataset: String,
        /// Where to write (created if missing; existing files are never
        /// overwritten).
        dir: PathBuf,
        /// Objects downloaded at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
    /// Read every object of a dataset and check it against the whole-object
    /// CRC-32 recorded at ingest. Exits 1 naming the first bad object.
    Verify {
        /// The dataset.
        dataset: String,
        /// Read path: grpc (ReadBatch and Read, works anywhere) or shm
        /// (registered region, zero-copy; needs a same-host server: --server
        /// unix:///path/storaged.sock, or a loopback address with
        /// --transport auto).
        #[arg(long, default_value = "grpc", value_parser = ["grpc", "shm"])]
        via: String,
        /// Times to read the whole dataset.
        #[arg(long, default_value_t = 1)]
        passes: u32,
        /// Region size in MiB for --via shm.
        #[arg(long, default_value_t = 64)]
        region_mib: u64,
    },
    /// Read shuffled epochs of a dataset the way a training job does
    /// (deterministic plan, prefetching loaders) and report samples/s and
    /// which path served the batches: shm when the connection is on the
    /// server's Unix socket (a unix:// --server, or a loopback one with
    /// --transport auto), else gRPC.
    Epoch {
        /// The dataset.
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
        /// Shuffle seed (the same seed and epoch give the same order).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// First epoch number.
        #[arg(long, default_value_t = 0)]
        epoch: u64,
        /// Epochs to run, one after another on the same connection.
        #[arg(long, default_value_t = 1)]
        epochs: u64,
        /// Read-ahead hints to storaged, on both paths: on or off.
        #[arg(long, default_value = "on", value_parser = ["on", "off"])]
        hints: String,
    },
    /// Delete a dataset and free its space (given back to the devices in
    /// the background). Asks first on a terminal.
    Rm {
        /// The dataset.
        dataset: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Devices, capacity used and free, datasets.
    Status {
        /// Print the whole Status response as one JSON object (the proto's
        /// field names; fields are only ever added), for scripts.
        #[arg(long)]
        json: bool,
    },
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
        if stdout_closed(&e) {
            // The reader went away (`| head`): what it wanted was printed.
            std::process::exit(0);
        }
        let msg = error_text(&e).replace('\n', " ");
        eprintln!("storagectl: error: {msg}");
        std::process::exit(1);
    }
}

/// Whether `e` is a write to a stdout whose reader has gone.
fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, each cause once (libraries often repeat their
/// source's message in their own).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = storaged_client::error_chain(cause);
        if text.is_empty() {
            text = part;
        } else if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

/// A spinner on stderr while a call runs (hidden when stderr is not a
/// terminal).
fn spinner(label: &str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_message(label.to_owned());
    start_ticking(&bar);
    bar
}

/// Draws `bar` at once, then every 200 ms. The first draw comes before
/// the ticker (which makes `tick` a no-op and first draws a period
/// later): a command shorter than that would otherwise show nothing.
fn start_ticking(bar: &ProgressBar) {
    bar.tick();
    bar.enable_steady_tick(Duration::from_millis(200));
}

/// A byte-progress bar on stderr for `total` bytes (hidden when stderr is
/// not a terminal).
fn bytes_bar(label: &str, total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {label} [{{elapsed_precise}}] {{wide_bar}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    start_ticking(&bar);
    bar
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

/// RFC 3339 UTC time of a unix timestamp in milliseconds, to the second.
fn rfc3339(ms: i64) -> String {
    let offset = std::time::Duration::from_millis(ms.unsigned_abs());
    let at = if ms >= 0 {
        std::time::UNIX_EPOCH.checked_add(offset)
    } else {
        std::time::UNIX_EPOCH.checked_sub(offset)
    };
    match at {
        Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
        None => format!("{ms} ms since the epoch"),
    }
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

/// Deadline of each call of a command without `--timeout`.
fn default_timeout(command: &Command) -> Option<Duration> {
    match command {
        Command::Status { .. }
        | Command::Ls { .. }
        | Command::Stat { .. }
        | Command::Rm { .. }
        | Command::Device { .. }
        | Command::Token { .. } => Some(Duration::from_secs(60)),
        Command::Ingest { .. }
        | Command::Cat { .. }
        | Command::Export { .. }
        | Command::Verify { .. }
        | Command::Epoch { .. }
        | Command::Scrub { .. } => None,
    }
}

/// `--timeout`: a number and a unit (ms, s, m, h), or `0`.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit: write 30s, 5m, 1h or 500ms"))?;
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number then ms, s, m or h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    if d.is_zero() {
        return Err("use 0 for no deadline".into());
    }
    Ok(d)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Token {
        command: TokenCommand::New { tenant },
    } = &cli.command
    {
        let token = storaged_client::new_token()?;
        let hash = storaged_proto::auth::token_sha256_hex(&token);
        outln!("token:  {token}");
        outln!("config: add to the [[tenant]] named {tenant:?} in storaged's config:");
        outln!("        tokens_sha256 = [\"{hash}\"]");
        outln!("use:    STORAGED_TOKEN={token} storagectl ...  (or --token)");
        return Ok(());
    }
    let options = ConnectOptions {
        token: cli.token.clone().filter(|t| !t.is_empty()),
        call_timeout: match cli.timeout {
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
            None => default_timeout(&cli.command),
        },
        tls_ca: cli.ca.clone(),
        tls_cert: cli.cert.clone(),
        tls_key: cli.key.clone(),
    };
    let client = if cli.transport == "auto" {
        Client::connect_auto_with(&cli.server, &options).await?
    } else {
        Client::connect_with(&cli.server, &options).await?
    };
    match cli.command {
        Command::Ingest {
            dataset,
            dir,
            class,
            skip_unreadable,
        } => {
            let options = IngestOptions {
                class,
                skip_unreadable,
            };
            ingest(&client, &dataset, &dir, options).await
        }
        Command::Scrub {
            dataset,
            rate_mib_s,
        } => scrub(&client, dataset, rate_mib_s).await,
        Command::Device {
            command:
                DeviceCommand::Replace {
                    old,
                    new,
                    healthy,
                    overwrite,
                },
        } => replace_device(&client, &old, &new, healthy, overwrite).await,
        Command::Token { .. } => unreachable!("handled before connecting"),
        Command::Ls { dataset: None, .. } => ls::datasets(&client).await,
        Command::Ls {
            dataset: Some(name),
            prefix,
            page_size,
            limit,
        } => ls::objects(&client, &name, &prefix, page_size, limit).await,
        Command::Cat {
            dataset,
            path,
            offset,
            length,
        } => object::cat(&client, &dataset, &path, offset, length).await,
        Command::Stat { dataset, path } => object::stat(&client, &dataset, &path).await,
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
        Command::Rm { dataset, yes } => rm::run(&client, &dataset, yes).await,
        Command::Status { json } => {
            let s = client.status().await?;
            status::print(&s, json)
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
    outln!(
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
async fn verify_grpc(
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

async fn replace_device(
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

async fn ingest(
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

async fn export(client: &Client, dataset: &str, dir: &Path, parallel: usize) -> anyhow::Result<()> {
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
