//! `storaged-bench`: storaged against the physical limit (fio) and the peers
//! a user would pick instead (nginx, local files), in one run.
//!
//! `cargo run --release -p storaged-bench -- [--quick] --out DIR` creates
//! the devices, generates the datasets, starts storaged and nginx, runs every
//! workload on a cold cache with the systems alternating (A B C A B C ...),
//! reports medians of the repetitions, writes `DIR/results.json` and prints a
//! summary table. It installs nothing: a missing fio or nginx is an error
//! that says how to install it, unless `--skip-peers`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use storaged_bench::datasets::{FileSet, Plan, generate, layouts};
use storaged_bench::results::{Measurement, Row, add_ratios, summarize};
use storaged_bench::stats::drop_caches;
use storaged_bench::systems::fio::{self, FioJob};
use storaged_bench::systems::mount::{self, Mount};
use storaged_bench::systems::nginx::{self, Nginx};
use storaged_bench::systems::storaged::{self as sd, Daemon};
use storaged_bench::systems::{Item, local};
use storaged_bench::{datasets, machine};
use storaged_client::BulkTcp;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "storaged-bench",
    about = "storaged against fio, nginx and local files, in one run"
)]
struct Args {
    /// Small datasets and one repetition: under a minute.
    #[arg(long)]
    quick: bool,
    /// Where results.json and the working files go.
    #[arg(long)]
    out: PathBuf,
    /// Device for storaged (repeatable): loop or block devices, or files.
    /// Default: 4 sparse files under OUT/work/devices.
    #[arg(long = "device")]
    devices: Vec<PathBuf>,
    /// Put the default device files on tmpfs (/dev/shm), which takes
    /// O_DIRECT here: the devices then cost no time, only the CPU of a
    /// copy, so every path is measured against its CPU ceiling (fio on the
    /// same files is still the limit). Removed after the run.
    #[arg(long, conflicts_with = "devices")]
    devices_on_tmpfs: bool,
    /// Run without fio and nginx (storaged and local files only).
    #[arg(long)]
    skip_peers: bool,
    /// Run without the `storagectl mount` rows (they need root and
    /// /dev/fuse).
    #[arg(long)]
    skip_mount: bool,
    /// Only these workloads (comma-separated), e.g. `shard_stream,list_1m`.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Keep OUT/work (datasets, device files: several GiB) after the run.
    #[arg(long)]
    keep_work: bool,
    /// The storaged binary (default: next to this one).
    #[arg(long)]
    storaged_bin: Option<PathBuf>,
    /// Huge pages for shared memory (client regions) during the run, the
    /// deployment tuning README.md recommends: written into
    /// /sys/kernel/mm/transparent_hugepage/shmem_enabled and put back
    /// afterwards; `as-is` leaves the kernel's setting alone. Both are
    /// recorded in results.json (`machine.thp_shmem*`).
    #[arg(long, default_value = "advise")]
    shmem_thp: String,
    /// An option for `storagectl mount` (repeatable, e.g.
    /// `--mount-arg=--no-direct-reads`), to measure the mount's settings.
    #[arg(long = "mount-arg", allow_hyphen_values = true)]
    mount_args: Vec<String>,
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("storaged-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// One system's run of one phase.
type Runs = Vec<(String, Vec<Measurement>)>;

/// Latency CDF `(percentile, us)` points of (workload, system, concurrency).
type Cdf = (String, String, u32, Vec<(f64, f64)>);

fn push(runs: &mut Runs, system: &str, m: Measurement) {
    match runs.iter_mut().find(|(s, _)| s == system) {
        Some((_, v)) => v.push(m),
        None => runs.push((system.to_owned(), vec![m])),
    }
}

struct Ctx {
    plan: Plan,
    peers: bool,
    daemon: Daemon,
    /// How to start the daemon again (the TLS workload restarts it).
    restart: Restart,
    client: storaged_client::Client,
    nginx: Option<Nginx>,
    /// Every dataset through `storagectl mount` (same-host path).
    mount: Option<Mount>,
    /// For the listing workload's fresh mounts.
    storagectl: PathBuf,
    /// `--mount-arg`s, for every mount.
    mount_args: Vec<String>,
    work: PathBuf,
    device_paths: Vec<String>,
    /// Device files on tmpfs (`--devices-on-tmpfs`): reads are CPU copies,
    /// so the copying TCP path's CPU floor (`tcp_device_floor`) is measured.
    devices_on_tmpfs: bool,
    fio_commands: Vec<String>,
    /// Whether every phase so far ran with the page cache dropped.
    cold: std::cell::Cell<bool>,
    /// Latency CDF of the last repetition: (workload, system, concurrency).
    cdfs: Vec<Cdf>,
}

/// What starting the harness's storaged takes.
struct Restart {
    bin: PathBuf,
    data_dir: PathBuf,
    devices: Vec<PathBuf>,
    device_size: u64,
}

impl Ctx {
    /// Stops the daemon and starts it again with `extra` arguments; the
    /// harness's client follows it (plain gRPC on the same pool).
    async fn restart_daemon(&mut self, extra: &[String]) -> anyhow::Result<()> {
        let r = &self.restart;
        // Swap in a placeholder only after the old one stopped: the data
        // dir is locked by its daemon.
        let old = std::mem::replace(&mut self.daemon, Daemon::placeholder());
        old.stop()?;
        self.daemon = Daemon::start_with(&r.bin, &r.data_dir, &r.devices, r.device_size, extra)?;
        self.client = sd::tcp_client(&self.daemon, BulkTcp::Off).await?;
        Ok(())
    }

    fn finish(&mut self, workload: &str, c: u32, runs: &Runs) -> Vec<Row> {
        for (system, reps) in runs {
            if let Some(last) = reps.last() {
                self.cdfs
                    .push((workload.into(), system.clone(), c, last.cdf()));
            }
        }
        runs.iter()
            .map(|(s, reps)| summarize(workload, s, c, reps))
            .collect()
    }
}

impl Ctx {
    /// `items` of `set` read through the mount (when there is one), as
    /// `storaged_mount`, on a cold cache.
    async fn measure_mount(
        &self,
        runs: &mut Runs,
        set: &FileSet,
        items: &[Item],
        c: u32,
    ) -> anyhow::Result<()> {
        let Some(m) = &self.mount else {
            return Ok(());
        };
        let read = async {
            tokio::task::block_in_place(|| mount::read_items(m, &self.daemon, &set.name, items, c))
        };
        self.measure_cold(runs, "storaged_mount", read).await
    }

    /// Drops the page cache and lets storaged go idle: a region the last
    /// system gave back is unpinned and freed in the background, CPU that
    /// would otherwise be charged to the next system measured.
    fn cold(&self) {
        self.cold.set(self.cold.get() & drop_caches());
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let before = self.daemon.cpu_seconds();
            std::thread::sleep(Duration::from_millis(100));
            // At most one 10 ms tick in 100 ms: idle.
            if self.daemon.cpu_seconds() - before <= 0.011 || Instant::now() >= deadline {
                break;
            }
        }
    }

    /// Drops the page cache, then runs `measure` and records it as
    /// `system`: every phase starts cold.
    async fn measure_cold(
        &self,
        runs: &mut Runs,
        system: &str,
        measure: impl std::future::Future<Output = anyhow::Result<Measurement>>,
    ) -> anyhow::Result<()> {
        self.cold();
        let disk_path = std::path::Path::new(&self.device_paths[0]);
        let before = storaged_bench::machine::disk_counters(disk_path);
        let mut m = measure.await?;
        if let (Some(a), Some(b)) = (before, storaged_bench::machine::disk_counters(disk_path)) {
            m.disk = Some(storaged_bench::results::DiskDelta {
                reads: b.reads - a.reads,
                read_bytes: (b.sectors_read - a.sectors_read) * 512,
                busy_ms: b.busy_ms - a.busy_ms,
            });
        }
        push(runs, system, m);
        Ok(())
    }
}

fn items_of(fs: &FileSet) -> Vec<Item> {
    fs.files
        .iter()
        .map(|(p, s)| Item {
            path: p.clone(),
            size: *s,
        })
        .collect()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::new(args.quick);
    let peers = !args.skip_peers;
    if peers {
        let mut missing = Vec::new();
        if !fio::available() {
            missing.push("fio");
        }
        if !nginx::available() {
            missing.push("nginx");
        }
        if !missing.is_empty() {
            bail!(
                "{} not installed: apt-get install -y {} (or pass --skip-peers)",
                missing.join(" and "),
                missing.join(" ")
            );
        }
    }
    let shmem_thp = match args.shmem_thp.as_str() {
        "as-is" => None,
        value => Some(
            machine::KernelSetting::apply(machine::SHMEM_THP_PATH, value).with_context(|| {
                format!(
                    "setting {} to {value} (needs root; --shmem-thp as-is leaves it)",
                    machine::SHMEM_THP_PATH
                )
            })?,
        ),
    };
    let thp_shmem_before_run = match &shmem_thp {
        Some(setting) => setting.before().to_owned(),
        None => machine::kernel_choice(machine::SHMEM_THP_PATH),
    };
    let storaged_bin = match args.storaged_bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("binary dir")?
            .join("storaged"),
    };
    let storagectl = storaged_bin.with_file_name("storagectl");
    for bin in [&storaged_bin, &storagectl] {
        if !bin.exists() {
            bail!("{} is missing: cargo build --release --bins", bin.display());
        }
    }
    if !args.skip_mount && !mount::available() {
        bail!("the storaged_mount rows need root and /dev/fuse: run as root, or pass --skip-mount");
    }
    // nginx resolves relative paths against its prefix: use absolute ones.
    let out_dir = std::path::absolute(&args.out)?;
    let work = out_dir.join("work");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;

    // Datasets as plain files.
    eprintln!("generating datasets...");
    let files_root = work.join("files");
    let mut sets = Vec::new();
    for (i, (name, files)) in layouts(&plan).into_iter().enumerate() {
        sets.push(generate(&files_root, name, files, i as u64 + 1)?);
    }
    let data_bytes: u64 = sets.iter().map(|s| s.total_bytes()).sum();
    let device_size = (data_bytes + data_bytes / 4) / 4 + (256 << 20);
    let tmpfs_devices = args
        .devices_on_tmpfs
        .then(|| PathBuf::from(format!("/dev/shm/storaged-bench-{}", std::process::id())));
    let devices = if let Some(dir) = &tmpfs_devices {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        (0..4).map(|i| dir.join(format!("dev{i}.img"))).collect()
    } else if args.devices.is_empty() {
        (0..4)
            .map(|i| work.join(format!("devices/dev{i}.img")))
            .collect()
    } else {
        args.devices.clone()
    };
    let daemon = Daemon::start(
        &storaged_bin,
        &work.join("storaged-data"),
        &devices,
        device_size,
    )?;
    // gRPC only: the TCP bulk channel has rows of its own.
    let client = sd::tcp_client(&daemon, BulkTcp::Off).await?;
    eprintln!(
        "ingesting {:.2} GiB into storaged...",
        data_bytes as f64 / (1u64 << 30) as f64
    );
    for s in &sets {
        client.ingest_dir(&s.name, &s.root, |_| {}).await?;
    }
    // Only the listing workload reads it (a million objects take minutes
    // to ingest on the full plan).
    if args.workloads.is_empty() || args.workloads.iter().any(|w| w == "list_1m") {
        eprintln!(
            "ingesting {} empty objects for the listing workload...",
            plan.list_objects
        );
        sd::ingest_empty_objects(&client, "list", plan.list_objects).await?;
    }
    let mount = if args.skip_mount {
        None
    } else {
        eprintln!("mounting every dataset with storagectl mount...");
        Some(Mount::start(
            &storagectl,
            &daemon.url,
            &work.join("mnt"),
            &args.mount_args,
        )?)
    };
    let machine = machine::describe(&devices, &thp_shmem_before_run);
    let nginx = if peers {
        Some(Nginx::start(&work.join("nginx"), &files_root)?)
    } else {
        None
    };
    let mut ctx = Ctx {
        restart: Restart {
            bin: storaged_bin.clone(),
            data_dir: work.join("storaged-data"),
            devices: devices.clone(),
            device_size,
        },
        plan,
        peers,
        daemon,
        client,
        nginx,
        mount,
        storagectl: storagectl.clone(),
        mount_args: args.mount_args.clone(),
        work: work.clone(),
        device_paths: devices.iter().map(|d| d.display().to_string()).collect(),
        devices_on_tmpfs: args.devices_on_tmpfs,
        fio_commands: Vec::new(),
        cold: std::cell::Cell::new(true),
        cdfs: Vec::new(),
    };

    let wanted = |w: &str| args.workloads.is_empty() || args.workloads.iter().any(|x| x == w);
    let mut rows: Vec<Row> = Vec::new();
    let shards = sets.iter().find(|s| s.name == "shards").expect("shards");
    if wanted("shard_stream") {
        rows.extend(shard_stream(&mut ctx, shards).await?);
    }
    for (workload, set) in [
        ("random_4k", "fixed4k"),
        ("random_128k", "fixed128k"),
        ("random_imagenet", "imagenet"),
    ] {
        if !wanted(workload) {
            continue;
        }
        let set = sets.iter().find(|s| s.name == set).expect("dataset");
        rows.extend(random(&mut ctx, workload, set).await?);
    }
    if wanted("list_1m") {
        rows.extend(listing(&mut ctx).await?);
    }
    if wanted("tls") {
        let random_set = sets
            .iter()
            .find(|s| s.name == "fixed128k")
            .expect("dataset");
        rows.extend(tls_cost(&mut ctx, &work, shards, random_set).await?);
    }
    add_ratios(&mut rows);

    let commands = serde_json::json!({
        "fio": ctx.fio_commands,
        "nginx": ctx.nginx.as_ref().map(|n| serde_json::json!({"command": n.command, "config": n.config})),
        "storaged": format!("{} serve --listen 127.0.0.1:0 --data-dir {} --device-size {} {}", storaged_bin.display(), work.join("storaged-data").display(), device_size, ctx.device_paths.iter().map(|d| format!("--device {d}")).collect::<Vec<_>>().join(" ")),
        "harness": std::env::args().collect::<Vec<_>>().join(" "),
    });
    let out = serde_json::json!({
        "machine": machine,
        "commands": commands,
        "settings": {
            "quick": args.quick,
            "repetitions": ctx.plan.repetitions,
            "cold_cache": ctx.cold.get(),
            "peers": ctx.peers,
            "devices_on_tmpfs": args.devices_on_tmpfs,
            "elapsed_s": started.elapsed().as_secs_f64(),
        },
        "results": rows,
    });
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&out)?)?;
    let plots = write_plots(&out_dir, &rows, &ctx.cdfs);
    print_table(&rows);
    eprintln!("plots: {}", plots.join(", "));
    if !ctx.cold.get() {
        eprintln!("note: caches could not be dropped (not root); buffered figures may be warm");
    }
    eprintln!(
        "wrote {} in {:.1} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    // Stop the servers before their files go.
    drop(ctx);
    if let Some(dir) = &tmpfs_devices {
        // Memory, not disk: never kept.
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if !args.keep_work {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    Ok(())
}

/// One repetition of the peers that read plain files: nginx (when
/// running) and local pread, O_DIRECT then buffered, each on a cold cache.
async fn run_peers(
    ctx: &mut Ctx,
    runs: &mut Runs,
    set: &FileSet,
    items: &[Item],
    c: u32,
) -> anyhow::Result<()> {
    if let Some(n) = &ctx.nginx {
        ctx.measure_cold(runs, "nginx", n.get_items(&set.name, items, c))
            .await?;
    }
    for (system, direct) in [("local_odirect", true), ("local_buffered", false)] {
        let (root, items) = (set.root.clone(), items.to_vec());
        let read = async move {
            tokio::task::spawn_blocking(move || local::read_items(&root, &items, c, direct)).await?
        };
        ctx.measure_cold(runs, system, read).await?;
    }
    Ok(())
}

async fn shard_stream(ctx: &mut Ctx, set: &FileSet) -> anyhow::Result<Vec<Row>> {
    let items = items_of(set);
    let (first, last) = (&items[0].path, &items[items.len() - 1].path);
    let (offset, size) = sd::device_region(&ctx.client, &set.name, first, last).await?;
    let mut rows = Vec::new();
    for &c in &ctx.plan.stream_concurrency.clone() {
        eprintln!("shard_stream, {c} stream(s)...");
        let mut runs: Runs = Vec::new();
        // The limit is the best of a small sweep: storaged's own shape
        // (up to 64 x 1 MiB reads in flight per stream, 128 in all, each
        // job over every device file), then per device file one job at
        // queue depth 16 and 64 and two jobs at 32; one configuration was
        // not the limit (storaged beat it by up to 1.8x on disk).
        let depth = (64 * c).min(128);
        let shared = FioJob {
            rw: "read",
            bs: "1M".into(),
            bssplit: false,
            iodepth: depth / c,
            numjobs: c,
            offset_bytes: offset,
            size_bytes: size,
            number_ios: None,
            filenames: ctx.device_paths.clone(),
        };
        let mut sweep = vec![shared.clone()];
        for (numjobs, iodepth) in [(1, 16), (1, 64), (2, 32)] {
            sweep.push(FioJob {
                iodepth,
                numjobs,
                ..shared.clone()
            });
        }
        ctx.fio_commands.push(shared.command_line());
        for job in &sweep[1..] {
            ctx.fio_commands.push(job.command_line_per_file());
        }
        for _ in 0..ctx.plan.repetitions {
            if ctx.peers {
                let best = async {
                    let mut best: Option<Measurement> = None;
                    for (i, job) in sweep.iter().enumerate() {
                        let m = if i == 0 {
                            job.run()?
                        } else {
                            job.run_per_file()?
                        };
                        if best.as_ref().is_none_or(|b| m.gib_per_s() > b.gib_per_s()) {
                            best = Some(m);
                        }
                    }
                    best.context("an empty fio sweep")
                };
                ctx.measure_cold(&mut runs, "fio", best).await?;
            }
            ctx.measure_cold(
                &mut runs,
                "storaged_grpc",
                sd::stream_objects(&ctx.daemon, &ctx.client, &set.name, &items, c),
            )
            .await?;
            ctx.measure_cold(
                &mut runs,
                "storaged_shm",
                sd::stream_objects_shm(&ctx.daemon, &set.name, &items, c),
            )
            .await?;
            ctx.measure_cold(
                &mut runs,
                "storaged_bulk",
                sd::stream_objects_bulk(&ctx.daemon, &set.name, &items, c),
            )
            .await?;
            ctx.measure_mount(&mut runs, set, &items, c).await?;
            run_peers(ctx, &mut runs, set, &items, c).await?;
            if c == 1 {
                // The socket floor: the same bytes through bare loopback TCP.
                let total: u64 = items.iter().map(|i| i.size).sum();
                let m = tokio::task::spawn_blocking(move || {
                    storaged_bench::systems::tcp::loopback(total)
                })
                .await??;
                push(&mut runs, "tcp_loopback", m);
            }
            if ctx.devices_on_tmpfs {
                // The CPU floor of any copying TCP read path: the same
                // device bytes read, sent, received and checked by bare
                // threads, one pair per stream.
                let files: Vec<std::path::PathBuf> =
                    ctx.device_paths.iter().map(Into::into).collect();
                let m = tokio::task::spawn_blocking(move || {
                    storaged_bench::systems::tcp::device_floor(&files, offset, size, c as usize)
                })
                .await??;
                push(&mut runs, "tcp_device_floor", m);
            }
        }
        rows.extend(
            runs.iter()
                .map(|(s, reps)| summarize("shard_stream", s, c, reps)),
        );
    }
    Ok(rows)
}

async fn random(ctx: &mut Ctx, workload: &str, set: &FileSet) -> anyhow::Result<Vec<Row>> {
    let all = items_of(set);
    let (first, last) = (&all[0].path, &all[all.len() - 1].path);
    let (offset, size) = sd::device_region(&ctx.client, &set.name, first, last).await?;
    let mut rng = datasets::Rng::new(42);
    let mut order = all.clone();
    rng.shuffle(&mut order);
    order.truncate(ctx.plan.random_items);
    let sizes: Vec<u64> = all.iter().map(|i| i.size).collect();
    let (bs, bssplit) = if sizes.iter().all(|&s| s == sizes[0]) {
        (format!("{}k", sizes[0] / 1024), false)
    } else {
        (fio::bssplit(&sizes), true)
    };
    let mut rows = Vec::new();
    for &c in &ctx.plan.concurrency.clone() {
        eprintln!("{workload}, {c} in flight...");
        let job = FioJob {
            rw: "randread",
            bs: bs.clone(),
            bssplit,
            iodepth: c,
            numjobs: 1,
            offset_bytes: offset,
            size_bytes: size,
            number_ios: Some(order.len() as u64),
            filenames: ctx.device_paths.clone(),
        };
        ctx.fio_commands.push(job.command_line());
        let mut runs: Runs = Vec::new();
        for _ in 0..ctx.plan.repetitions {
            if ctx.peers {
                ctx.measure_cold(&mut runs, "fio", async { job.run() })
                    .await?;
            }
            ctx.measure_cold(
                &mut runs,
                "storaged_grpc",
                sd::read_batch(&ctx.daemon, &ctx.client, &set.name, &order, c, false),
            )
            .await?;
            ctx.measure_cold(
                &mut runs,
                "storaged_grpc_anyorder",
                sd::read_batch(&ctx.daemon, &ctx.client, &set.name, &order, c, true),
            )
            .await?;
            ctx.measure_mount(&mut runs, set, &order, c).await?;
            run_peers(ctx, &mut runs, set, &order, c).await?;
            if workload == "random_imagenet" && Some(&c) == ctx.plan.concurrency.last() {
                // A training job's view: 4 loader workers, batches of 256,
                // a shuffled epoch of the whole dataset, over gRPC with
                // read-ahead hints and without, and over the same-host
                // zero-copy path; the default (uniform) shuffle, and the
                // block shuffle of 64 path-adjacent objects it replaced
                // (the unbiased default must keep >= 0.9x its samples/s).
                let (tcp, unix) = (&ctx.daemon.url, &ctx.daemon.unix_url);
                for (system, url, bulk, hints, block) in [
                    ("storaged_loader_hints", tcp, BulkTcp::Off, true, 1),
                    ("storaged_loader_nohints", tcp, BulkTcp::Off, false, 1),
                    ("storaged_loader_bulk", tcp, BulkTcp::Required, false, 1),
                    ("storaged_loader_shm", unix, BulkTcp::Off, false, 1),
                    ("storaged_loader_hints_block64", tcp, BulkTcp::Off, true, 64),
                    ("storaged_loader_shm_block64", unix, BulkTcp::Off, false, 64),
                ] {
                    let epoch = sd::loader_epoch(&ctx.daemon, url, bulk, &set.name, hints, block);
                    ctx.measure_cold(&mut runs, system, epoch).await?;
                }
            }
        }
        rows.extend(ctx.finish(workload, c, &runs));
    }
    Ok(rows)
}

/// What tenants and TLS cost: the same daemon (same build, same pool)
/// restarted between plain gRPC without tenants, a bearer token on every
/// call, and the token over TLS, in turn each repetition, on shard
/// streaming and random 128 KiB reads.
async fn tls_cost(
    ctx: &mut Ctx,
    work: &std::path::Path,
    shards: &FileSet,
    random_set: &FileSet,
) -> anyhow::Result<Vec<Row>> {
    let tls = sd::TlsSetup::create(&work.join("tls"))?;
    let shard_items = items_of(shards);
    let mut order = items_of(random_set);
    datasets::Rng::new(42).shuffle(&mut order);
    order.truncate(ctx.plan.random_items);
    let streams = *ctx.plan.stream_concurrency.last().unwrap_or(&1);
    let in_flight = 16;
    let mut stream_runs: Runs = Vec::new();
    let mut random_runs: Runs = Vec::new();
    // Cheap runs, and the difference sought is a few percent: at least 5
    // alternating repetitions, whatever the plan says.
    let repetitions = ctx.plan.repetitions.max(5);
    for rep in 0..repetitions {
        eprintln!("tls, repetition {}/{repetitions}...", rep + 1);
        for (system, auth, secured) in [
            ("storaged_grpc", false, false),
            ("storaged_grpc_token", true, false),
            ("storaged_grpc_tls", true, true),
        ] {
            ctx.restart_daemon(&if auth {
                tls.daemon_args(secured)
            } else {
                Vec::new()
            })
            .await?;
            let client = if auth {
                tls.client(&ctx.daemon.url, secured).await?
            } else {
                ctx.client.clone()
            };
            ctx.measure_cold(
                &mut stream_runs,
                system,
                sd::stream_objects(&ctx.daemon, &client, &shards.name, &shard_items, streams),
            )
            .await?;
            ctx.measure_cold(
                &mut random_runs,
                system,
                sd::read_batch(
                    &ctx.daemon,
                    &client,
                    &random_set.name,
                    &order,
                    in_flight,
                    false,
                ),
            )
            .await?;
        }
    }
    // Back to the plain daemon for whatever runs next.
    ctx.restart_daemon(&[]).await?;
    let mut rows = ctx.finish("tls_shard_stream", streams, &stream_runs);
    rows.extend(ctx.finish("tls_random_128k", in_flight, &random_runs));
    Ok(rows)
}

async fn listing(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    eprintln!("list_1m ({} objects)...", ctx.plan.list_objects);
    let mut lists = Vec::new();
    let mut stats = Vec::new();
    for _ in 0..ctx.plan.repetitions {
        let (l, s) = sd::list_and_stat(
            &ctx.daemon,
            &ctx.client,
            "list",
            ctx.plan.list_objects,
            ctx.plan.stat_samples,
        )
        .await?;
        lists.push(l);
        stats.push(s);
    }
    let mut list_row = summarize("list_1m", "storaged_grpc", 1, &lists);
    let stat_row = summarize("list_1m", "storaged_grpc", 1, &stats);
    // The listing row carries the listing rate and the stat latencies.
    list_row.p50_us = stat_row.p50_us;
    list_row.p99_us = stat_row.p99_us;
    list_row.p999_us = stat_row.p999_us;
    let mut rows = vec![list_row];
    if ctx.mount.is_some() {
        // Each listing on a fresh mount: the dataset's index is built
        // from nothing, as at a user's first `ls`.
        let mut runs: Runs = Vec::new();
        for _ in 0..ctx.plan.repetitions {
            for (system, command) in [
                ("storaged_mount_ls", "ls -fR {}/list | wc -l"),
                ("storaged_mount_find", "find {}/list | wc -l"),
            ] {
                let m = Mount::start(
                    &ctx.storagectl,
                    &ctx.daemon.url,
                    &ctx.work.join("mnt-list"),
                    &ctx.mount_args,
                )?;
                let command = command.replace("{}", &m.path.display().to_string());
                let pid = m.pid();
                let listed =
                    async { tokio::task::block_in_place(|| mount::time_listing(&command, pid)) };
                ctx.measure_cold(&mut runs, system, listed).await?;
            }
        }
        rows.extend(
            runs.iter()
                .map(|(s, reps)| summarize("list_1m", s, 1, reps)),
        );
    }
    Ok(rows)
}

/// Throughput-against-concurrency and latency-CDF PNGs; returns the files.
fn write_plots(out: &std::path::Path, rows: &[Row], cdfs: &[Cdf]) -> Vec<String> {
    let mut written = Vec::new();
    let mut try_plot = |name: String, r: Result<(), Box<dyn std::error::Error>>| match r {
        Ok(()) => written.push(name),
        Err(e) => eprintln!("warning: plot {name} failed: {e}"),
    };
    for w in [
        "shard_stream",
        "random_4k",
        "random_128k",
        "random_imagenet",
    ] {
        let name = format!("throughput_{w}.png");
        try_plot(
            name.clone(),
            storaged_bench::plots::throughput(&out.join(&name), w, rows),
        );
        for c in [16u32, 64] {
            let series: Vec<(String, Vec<(f64, f64)>)> = cdfs
                .iter()
                .filter(|(wl, _, cc, pts)| wl == w && *cc == c && !pts.is_empty())
                .map(|(_, s, _, pts)| (s.clone(), pts.clone()))
                .collect();
            if series.is_empty() {
                continue;
            }
            let name = format!("latency_cdf_{w}_c{c}.png");
            let title = format!("{w}, {c} in flight: latency per item");
            try_plot(
                name.clone(),
                storaged_bench::plots::latency_cdf(&out.join(&name), &title, &series),
            );
        }
    }
    written
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<16} {:<23} {:>5} {:>8} {:>11} {:>9} {:>9} {:>8} {:>8} {:>7} {:>8} {:>5}",
        "workload",
        "system",
        "conc",
        "GiB/s",
        "samples/s",
        "p50 us",
        "p99 us",
        "srv s/G",
        "cli s/G",
        "x fio",
        "disk KiB",
        "busy%"
    );
    for r in rows {
        println!(
            "{:<16} {:<23} {:>5} {:>8} {:>11} {:>9} {:>9} {:>8} {:>8} {:>7} {:>8} {:>5}",
            r.workload,
            r.system,
            r.concurrency,
            fmt(r.gib_per_s, 3),
            fmt(r.samples_per_s, 0),
            fmt(r.p50_us, 0),
            fmt(r.p99_us, 0),
            fmt(r.cpu_s_per_gib_server, 2),
            fmt(r.cpu_s_per_gib_client, 2),
            fmt(r.ratio_to_fio, 2),
            fmt(r.disk_read_kib_mean, 0),
            fmt(r.disk_busy_pct, 0),
        );
    }
}
