//! `storagectl`: the command-line client of storaged.
//!
//! Every subcommand is a thin layer over `storaged-client`. Errors print as
//! one line on stderr (`storagectl: error: NOT_FOUND: ...`) with exit code 1;
//! usage errors exit with 2 (clap's convention).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
mod safe_tree;
use safe_tree::shown;
use storaged_client::region::RegionRead;
use storaged_client::{
    BatchItem, BulkTcp, Client, ConnectOptions, IngestOptions, IngestProgress, LoaderOptions,
    ObjectInfo, Plan, PlanSpec, Transport,
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
mod admin;
mod epoch;
mod ls;
mod mount;
mod object;
mod rm;
mod status;
mod transfer;
mod verify;
use admin::{replace_device, scrub};
use epoch::{EpochRun, run_epoch};
use transfer::{export, ingest};
use verify::verify;

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
    /// How reads travel. `auto`: a loopback --server switches to the
    /// server's Unix socket when this process may use it (same pool), so
    /// reads take shared memory; a remote one reads over storaged's TCP
    /// bulk channel where it offers one, else gRPC. `shm`: the Unix socket
    /// or fail. `bulk`: the TCP bulk channel or fail. `grpc`: gRPC over
    /// the --server transport only. `as-given`: the --server transport,
    /// with the TCP bulk channel where offered.
    #[arg(long, default_value = "auto", value_parser = clap::builder::PossibleValuesParser::new(Transport::NAMES).map(|s| s.parse::<Transport>().expect("one of Transport::NAMES")), global = true)]
    transport: Transport,
    /// TCP bulk channel connections at most at once (nconnect); 0: the
    /// client's default.
    #[arg(long, default_value_t = 0, global = true)]
    bulk_connections: usize,
    /// On the same host, send reads into memory regions as gRPC calls
    /// instead of on storaged's bulk channel (its leaner framing); for
    /// comparing the two.
    #[arg(long, global = true)]
    read_into_over_grpc: bool,
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
enum ClusterCommand {
    /// Nodes (up or down, lease, address, capacity), the placement map and
    /// its epoch, as the cluster's control plane says now. Exits 1 when
    /// the server is not in a cluster or its control plane is out of
    /// reach.
    Status {
        /// The whole ClusterStatus response as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Move every share NODE holds to other nodes while reads go on; NODE
    /// takes no new data from the start, and is "drained" (may be stopped
    /// for good) at the end. Run it again to resume. A dead NODE's shares
    /// are rebuilt from the other nodes instead.
    Drain {
        /// The node's id.
        node: String,
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
        /// Read path: grpc (ReadBatch and Read, works anywhere), shm
        /// (registered region, zero-copy; needs a same-host server: --server
        /// unix:///path/storaged.sock, or a loopback address with
        /// --transport auto) or bulk (storaged's TCP bulk channel into this
        /// process's region, every window checked here; a TCP --server with
        /// --transport bulk or as-given).
        #[arg(long, default_value = "grpc", value_parser = ["grpc", "shm", "bulk"])]
        via: String,
        /// Times to read the whole dataset.
        #[arg(long, default_value_t = 1)]
        passes: u32,
        /// Region size in MiB for --via shm and bulk.
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
    /// Mount every dataset (or one) as a read-only file tree, in the
    /// foreground: prints a line ending in "ready" once mounted; SIGINT or
    /// SIGTERM unmounts.
    Mount(mount::MountArgs),
    /// The cluster the server belongs to (storaged serve --cluster).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
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
    // A mount answers many reads at once; other commands need little.
    let workers = if matches!(cli.command, Command::Mount(_)) {
        4
    } else {
        2
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
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

/// Bytes in binary units ("1.50 MiB"), as the progress bars show them.
fn human(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
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
        | Command::Cluster {
            command: ClusterCommand::Status { .. },
        }
        | Command::Ls { .. }
        | Command::Stat { .. }
        | Command::Rm { .. }
        | Command::Device { .. }
        | Command::Mount(_)
        | Command::Token { .. } => Some(Duration::from_secs(60)),
        Command::Ingest { .. }
        | Command::Cluster {
            command: ClusterCommand::Drain { .. },
        }
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

/// A client for the server and credentials on the command line.
async fn connect(cli: &Cli) -> anyhow::Result<Client> {
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
        read_into_over_grpc: cli.read_into_over_grpc,
        bulk_tcp: BulkTcp::Auto,
        bulk_tcp_connections: cli.bulk_connections,
        bulk_tcp_addr: None,
    };
    let client = Client::connect_transport(&cli.server, cli.transport, &options).await?;
    Ok(client)
}

/// `storagectl token new`: a new token and the hash storaged's config
/// names it by.
fn new_token(tenant: &str) -> anyhow::Result<()> {
    let token = storaged_client::new_token()?;
    let hash = storaged_proto::auth::token_sha256_hex(&token);
    outln!("token:  {token}");
    outln!("config: add to the [[tenant]] named {tenant:?} in storaged's config:");
    outln!("        tokens_sha256 = [\"{hash}\"]");
    outln!("use:    STORAGED_TOKEN={token} storagectl ...  (or --token)");
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Token {
        command: TokenCommand::New { tenant },
    } = &cli.command
    {
        return new_token(tenant);
    }
    let client = connect(&cli).await?;
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
        } => {
            let regions = cli.transport.reads_into_regions(&client).await;
            object::cat(&client, &dataset, &path, (offset, length), regions).await
        }
        Command::Stat { dataset, path } => object::stat(&client, &dataset, &path).await,
        Command::Export {
            dataset,
            dir,
            parallel,
        } => {
            let regions = cli.transport.reads_into_regions(&client).await;
            export(&client, &dataset, &dir, parallel.max(1), regions).await
        }
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
        Command::Mount(args) => mount::run(client, args).await,
        Command::Status { json } => {
            let s = client.status().await?;
            status::print(&s, json)
        }
        Command::Cluster {
            command: ClusterCommand::Status { json },
        } => {
            let s = client.cluster_status().await?;
            status::print_cluster(&s, json)
        }
        Command::Cluster {
            command: ClusterCommand::Drain { node },
        } => {
            let r = client.drain_node(&node).await?;
            outln!(
                "drained {node}: {} dataset share(s) moved, {}; placement epoch {}; it holds nothing now and may be stopped",
                r.datasets_moved,
                human(r.bytes_moved),
                r.placement_epoch
            );
            Ok(())
        }
    }
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
        assert_eq!(human(3 << 20), "3.00 MiB");
    }
}
