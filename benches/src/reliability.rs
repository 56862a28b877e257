//! `storaged-reliability`: the fault campaigns behind RELIABILITY.md, on the
//! real daemon.
//!
//! `cargo run --release -p storaged-bench --bin storaged-reliability -- [--quick] --out DIR`
//! creates 5 device files, ingests about 1 GiB (`--quick`: 128 MiB) as
//! `ec:4+1` (shards and small samples), and runs, in order:
//!
//! 0. **Ingest cost.** The tree ingested as `stripe` and as `ec:4+1`.
//! 1. **Bit flips.** Rounds of flips written into the device files while
//!    storaged is stopped (data and parity units, one unit per stripe per
//!    round; and stripes with a flip in every unit, each in a different
//!    32 KiB row, repairable row by row; plus one superblock byte per round),
//!    each followed by a start, a scrub and a byte-for-byte read of every
//!    object; then a live phase with `--fault-inject` flipping bits and
//!    failing reads. Counts injected, detected, repaired, unrecoverable and
//!    wrong bytes served.
//! 2. **Degraded throughput.** Shard streaming and random samples, healthy
//!    and with one device file removed, same run.
//! 3. **Rebuild.** `device replace` onto a new file: seconds per GiB, and
//!    shard streaming during the rebuild.
//! 4. **Scrub.** Scrub GiB/s unthrottled; random-sample p99 with no scrub
//!    and with a scrub at the default rate (64 MiB/s).
//! 5. **Hostile clients.** With two tenants: a victim's shard read latency
//!    idle and while the other tenant holds 50 streams it never reads
//!    (two connections, windows never opened); storaged's resident memory
//!    before and while two 100 000-item ReadBatches and a 48-item
//!    any-order one sit unread.
//!
//! `--only hostile,scrub` runs some phases (after the ingest).
//!
//! Every figure is a median of the repetitions (3, or 1 with `--quick`),
//! with page caches dropped before each measurement. Results go to
//! `DIR/reliability.json` and a Markdown table on stdout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use storaged::catalog::Catalog;
use storaged::device::{SUPERBLOCK_BYTES, SUPERBLOCK_COPY_OFFSET, Superblock};
use storaged::store::redundancy::EcDataset;
use storaged_bench::stats::{drop_caches, median, percentile};
use storaged_bench::systems::Item;
use storaged_bench::systems::storaged::{self as sd, Daemon};
use storaged_client::Client;
use storaged_proto::pb;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICES: usize = 5;
const CLASS: &str = "ec:4+1";

#[derive(Parser)]
#[command(
    name = "storaged-reliability",
    about = "Fault campaigns of RELIABILITY.md"
)]
struct Args {
    /// 128 MiB instead of 1 GiB, one repetition, fewer flip rounds.
    #[arg(long)]
    quick: bool,
    /// Working files and reliability.json go here.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the flip positions and the live fault layer.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The storaged binary (default: next to this one).
    #[arg(long)]
    storaged_bin: Option<PathBuf>,
    /// Only these phases (bitflip, degraded, rebuild, scrub, hostile).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// xorshift64*: flip positions from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Deterministic content of object `i` (the check needs no copy on disk).
fn content(i: u64, len: usize) -> Vec<u8> {
    storaged::testkit::pattern(i, len)
}

struct Setup {
    bin: PathBuf,
    data: PathBuf,
    devices: Vec<PathBuf>,
    device_size: u64,
    shards: Vec<Item>,
    samples: Vec<Item>,
    reps: usize,
}

impl Setup {
    fn start(&self, extra: &[String]) -> anyhow::Result<Daemon> {
        Daemon::start_with(
            &self.bin,
            &self.data,
            &self.devices,
            self.device_size,
            extra,
        )
    }

    fn all_items(&self) -> impl Iterator<Item = (u64, &Item)> {
        self.shards
            .iter()
            .chain(&self.samples)
            .enumerate()
            .map(|(i, it)| (i as u64, it))
    }
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("storaged-reliability: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = match &args.storaged_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary dir")?
            .join("storaged"),
    };
    let work = args.out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let (shard_count, sample_count) = if args.quick { (6, 320) } else { (48, 2560) };
    let src = work.join("src");
    let mut shards = Vec::new();
    let mut samples = Vec::new();
    for i in 0..shard_count {
        shards.push(Item {
            path: format!("shards/{i:04}.tar"),
            size: 16 << 20,
        });
    }
    for i in 0..sample_count {
        samples.push(Item {
            path: format!("samples/{i:06}.jpg"),
            size: 60_000 + (i as u64 * 7919) % 80_000,
        });
    }
    let data = work.join("data");
    std::fs::create_dir_all(&data)?;
    let setup = Setup {
        bin,
        devices: (0..DEVICES)
            .map(|i| work.join(format!("dev{i}.img")))
            .collect(),
        data,
        device_size: if args.quick { 128 << 20 } else { 512 << 20 },
        shards,
        samples,
        reps: if args.quick { 1 } else { 3 },
    };
    for (i, it) in setup.all_items() {
        let p = src.join(&it.path);
        std::fs::create_dir_all(p.parent().expect("parent"))?;
        std::fs::write(&p, content(i, it.size as usize))?;
    }
    let total: u64 = setup.all_items().map(|(_, it)| it.size).sum();
    eprintln!(
        "dataset: {} objects, {:.2} GiB",
        setup.all_items().count(),
        total as f64 / (1u64 << 30) as f64
    );
    // Ingest cost of the class: the same tree as `stripe` (then removed)
    // and as ec:4+1, from the page cache, same run.
    let mut ingest = serde_json::Map::new();
    {
        let d = setup.start(&[])?;
        let client = Client::connect(&d.url).await?;
        for (name, class) in [("train-stripe", "stripe"), ("train", CLASS)] {
            let t0 = Instant::now();
            client
                .ingest_dir_as(name, &src, Some(class.parse()?), |_| {})
                .await?;
            let gib_s = total as f64 / t0.elapsed().as_secs_f64() / (1u64 << 30) as f64;
            eprintln!("ingest as {class}: {gib_s:.2} GiB/s");
            ingest.insert(format!("{class}_gib_s"), gib_s.into());
        }
        client.delete_dataset("train-stripe").await?;
        d.stop()?;
    }
    std::fs::remove_dir_all(&src)?;

    let mut out = serde_json::Map::new();
    out.insert("ingest".into(), serde_json::Value::Object(ingest));
    let wanted = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    if wanted("bitflip") {
        out.insert("bitflip".into(), bitflips(&setup, &args).await?);
    }
    if wanted("degraded") {
        out.insert("degraded".into(), degraded(&setup).await?);
    }
    if wanted("rebuild") {
        out.insert("rebuild".into(), rebuild(&setup).await?);
    }
    if wanted("scrub") {
        out.insert("scrub".into(), scrub(&setup).await?);
    }
    if wanted("hostile") {
        out.insert("hostile".into(), hostile(&setup, &work).await?);
    }
    let json = serde_json::Value::Object(out);
    std::fs::write(
        args.out.join("reliability.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&json)?);
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Reads every object and compares it with what was ingested. Returns
/// (objects exact, objects failed with an error, wrong bytes served).
async fn check_all(setup: &Setup, client: &Client) -> anyhow::Result<(u64, u64, u64)> {
    let ds = client.dataset("train")?;
    let (mut exact, mut failed, mut wrong) = (0, 0, 0);
    for (i, it) in setup.all_items() {
        match ds.read(&it.path).await {
            Ok(got) => {
                let want = content(i, it.size as usize);
                let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count() as u64
                    + (got.len() as i64 - want.len() as i64).unsigned_abs();
                if diff == 0 {
                    exact += 1;
                } else {
                    wrong += diff;
                }
            }
            Err(_) => failed += 1,
        }
    }
    Ok((exact, failed, wrong))
}

/// Flips one bit of `path` at `offset`.
fn flip(path: &Path, offset: u64, bit: u8) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset)?;
    b[0] ^= 1 << (bit % 8);
    f.write_all_at(&b, offset)?;
    f.sync_all()?;
    Ok(())
}

async fn scrub_once(client: &Client, rate_mib_s: u64) -> anyhow::Result<pb::ScrubReport> {
    Ok(client
        .scrub(None, rate_mib_s)
        .await?
        .report(|_, _| {})
        .await?)
}

async fn bitflips(setup: &Setup, args: &Args) -> anyhow::Result<serde_json::Value> {
    let mut rng = Rng(args.seed | 1);
    let rounds = if args.quick { 3 } else { 10 };
    // The layout, from a superblock and the catalog (storaged is stopped).
    let sb = {
        let bytes = std::fs::read(&setup.devices[0])?;
        match Superblock::probe(&bytes[..SUPERBLOCK_BYTES], &setup.devices[0])? {
            storaged::device::Probe::Ours(sb) => sb,
            _ => bail!("device 0 has no superblock"),
        }
    };
    let record = {
        let catalog = Catalog::open(&setup.data.join("catalog.redb"), sb.pool_id, false)?;
        catalog
            .datasets()?
            .into_iter()
            .find(|(n, _)| n == "train")
            .context("dataset train")?
            .1
    };
    let ec = EcDataset::for_record(&record, sb.layout()).context("an ec dataset")?;
    let stripes = ec.map.stripes();
    let width = ec.map.geometry.width();
    let unit = ec.map.unit_bytes();
    let per_round = (stripes / 2).clamp(1, 100);
    // Stripes per round whose every unit gets a flip, each in a different
    // 32 KiB row (rebuilt row by row; one flip per unit used to lose the
    // stripe).
    let rows = (unit / storaged::ec::UNIT_ROW_BYTES).max(1);
    let scattered_per_round = if rows >= u64::from(width) {
        (stripes / 8).clamp(1, 20)
    } else {
        0
    };
    let (mut scattered_stripes, mut scattered_injected) = (0u64, 0u64);
    let (mut injected, mut metadata_injected) = (0u64, 0u64);
    let (mut detected, mut repaired, mut unrecoverable, mut wrong, mut read_errors) =
        (0, 0, 0, 0, 0);
    let mut superblocks_repaired = 0u64;
    for round in 0..rounds {
        // Distinct stripes this round, one random unit (data or parity) of
        // each, one random bit.
        let mut chosen = std::collections::BTreeSet::new();
        while (chosen.len() as u64) < per_round {
            chosen.insert(rng.below(stripes));
        }
        for s in &chosen {
            let p = rng.below(u64::from(width)) as u32;
            let (d, off) = ec.map.unit_location(*s, p);
            flip(
                &setup.devices[d as usize],
                off + rng.below(unit),
                rng.below(8) as u8,
            )?;
            injected += 1;
        }
        let mut scattered = std::collections::BTreeSet::new();
        while (scattered.len() as u64) < scattered_per_round.min(stripes - chosen.len() as u64) {
            let s = rng.below(stripes);
            if !chosen.contains(&s) {
                scattered.insert(s);
            }
        }
        for s in &scattered {
            let first_row = rng.below(rows);
            for p in 0..width {
                let (d, off) = ec.map.unit_location(*s, p);
                let row = (first_row + u64::from(p)) % rows;
                flip(
                    &setup.devices[d as usize],
                    off + row * storaged::ec::UNIT_ROW_BYTES
                        + rng.below(storaged::ec::UNIT_ROW_BYTES),
                    rng.below(8) as u8,
                )?;
                scattered_injected += 1;
            }
            scattered_stripes += 1;
        }
        // Metadata: a byte of one superblock copy of one device.
        let d = rng.below(DEVICES as u64) as usize;
        let copy = if round % 2 == 0 {
            0
        } else {
            SUPERBLOCK_COPY_OFFSET
        };
        flip(&setup.devices[d], copy + rng.below(88), rng.below(8) as u8)?;
        metadata_injected += 1;

        let daemon = setup.start(&[])?;
        let client = Client::connect(&daemon.url).await?;
        let st = client.status().await?;
        superblocks_repaired += u64::from(st.superblocks_repaired);
        let report = scrub_once(&client, 100_000).await?;
        detected += report.corrupt;
        repaired += report.repaired;
        unrecoverable += report.unrecoverable;
        let (_, failed, w) = check_all(setup, &client).await?;
        read_errors += failed;
        wrong += w;
        eprintln!(
            "flip round {round}: {} flips, {} stripes with a flip in every unit (distinct rows) + 1 superblock byte; scrub found {} corrupt, repaired {}, unrecoverable {}; wrong bytes {w}",
            chosen.len(),
            scattered.len(),
            report.corrupt,
            report.repaired,
            report.unrecoverable
        );
        daemon.stop()?;
    }
    // Live: bit flips and read errors through the fault layer.
    let daemon = setup.start(&[
        "--fault-inject".into(),
        format!("seed={},flip=0.02,read_eio=0.005", args.seed),
    ])?;
    let client = Client::connect(&daemon.url).await?;
    let mut live_wrong = 0;
    let mut live_errors = 0;
    for _ in 0..2 {
        let (_, failed, w) = check_all(setup, &client).await?;
        live_errors += failed;
        live_wrong += w;
    }
    let st = client.status().await?;
    let live_rebuilt = st.datasets.first().map(|d| d.reconstructions).unwrap_or(0);
    daemon.stop()?;
    // Leave the pool clean for the next campaigns.
    let daemon = setup.start(&[])?;
    let client = Client::connect(&daemon.url).await?;
    let last = scrub_once(&client, 100_000).await?;
    daemon.stop()?;
    Ok(serde_json::json!({
        "rounds": rounds,
        "offline_flips_injected": injected,
        "scattered_stripes": scattered_stripes,
        "scattered_flips_injected": scattered_injected,
        "metadata_flips_injected": metadata_injected,
        "offline_units_detected": detected,
        "offline_units_repaired": repaired,
        "offline_unrecoverable": unrecoverable,
        "superblocks_repaired": superblocks_repaired,
        "offline_read_errors": read_errors,
        "offline_wrong_bytes_served": wrong,
        "live_flips_injected": st.faults().flips_injected,
        "live_faults_injected": st.faults().injected,
        "live_stripes_rebuilt": live_rebuilt,
        "live_checksum_mismatches_detected": st.reads().checksum_mismatches,
        "live_read_errors": live_errors,
        "live_wrong_bytes_served": live_wrong,
        "final_scrub_corrupt": last.corrupt,
    }))
}

/// Shard streaming (GiB/s, 4 streams) and random samples (samples/s, 64 in
/// flight): medians of `reps` cold runs.
async fn foreground(setup: &Setup, daemon: &Daemon) -> anyhow::Result<(f64, f64)> {
    let client = Client::connect(&daemon.url).await?;
    let (mut stream, mut sample) = (Vec::new(), Vec::new());
    let mut order = setup.samples.clone();
    let mut rng = Rng(7);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for _ in 0..setup.reps {
        drop_caches();
        let m = sd::stream_objects(daemon, &client, "train", &setup.shards, 4).await?;
        stream.push(Some(m.bytes as f64 / m.seconds / (1u64 << 30) as f64));
        drop_caches();
        let m = sd::read_batch(daemon, &client, "train", &order, 64, true).await?;
        sample.push(Some(m.samples as f64 / m.seconds));
    }
    Ok((
        median(&stream).unwrap_or(0.0),
        median(&sample).unwrap_or(0.0),
    ))
}

async fn degraded(setup: &Setup) -> anyhow::Result<serde_json::Value> {
    let daemon = setup.start(&[])?;
    let (h_stream, h_samples) = foreground(setup, &daemon).await?;
    daemon.stop()?;
    let lost = &setup.devices[DEVICES - 1];
    let aside = lost.with_extension("aside");
    std::fs::rename(lost, &aside)?;
    let daemon = setup.start(&[])?;
    let (d_stream, d_samples) = foreground(setup, &daemon).await?;
    let client = Client::connect(&daemon.url).await?;
    let (exact, failed, wrong) = check_all(setup, &client).await?;
    daemon.stop()?;
    std::fs::rename(&aside, lost)?;
    eprintln!(
        "degraded: stream {d_stream:.2} vs {h_stream:.2} GiB/s, samples {d_samples:.0} vs {h_samples:.0}/s"
    );
    Ok(serde_json::json!({
        "healthy_stream_gib_s": h_stream,
        "degraded_stream_gib_s": d_stream,
        "stream_ratio": d_stream / h_stream,
        "healthy_samples_s": h_samples,
        "degraded_samples_s": d_samples,
        "samples_ratio": d_samples / h_samples,
        "degraded_objects_exact": exact,
        "degraded_read_errors": failed,
        "degraded_wrong_bytes": wrong,
    }))
}

async fn rebuild(setup: &Setup) -> anyhow::Result<serde_json::Value> {
    let daemon = setup.start(&[])?;
    let (h_stream, _) = foreground(setup, &daemon).await?;
    daemon.stop()?;
    let lost = setup.devices[1].clone();
    std::fs::remove_file(&lost)?;
    let daemon = setup.start(&[])?;
    let client = Client::connect(&daemon.url).await?;
    let new = lost.with_file_name("dev1-new.img");
    // storaged never creates a replacement device: the operator does.
    std::fs::File::create(&new)?.set_len(std::fs::metadata(&setup.devices[0])?.len())?;
    drop_caches();
    let started = Instant::now();
    let job = client
        .replace_device("1", &new.display().to_string(), Default::default())
        .await?;
    // Foreground streaming for as long as the rebuild runs.
    let reader = {
        let client = client.clone();
        let shards = setup.shards.clone();
        tokio::spawn(async move {
            let ds = client.dataset("train")?;
            let mut bytes = 0u64;
            let t0 = Instant::now();
            let mut i = 0;
            loop {
                let it: &Item = &shards[i % shards.len()];
                let mut s = std::pin::pin!(ds.read_stream(&it.path, 0, None));
                while let Some(c) = s.next().await {
                    bytes += c?.len() as u64;
                }
                i += 1;
                if client
                    .status()
                    .await
                    .map(|s| s.rebuild.is_none())
                    .unwrap_or(true)
                {
                    break;
                }
            }
            anyhow::Ok(bytes as f64 / t0.elapsed().as_secs_f64() / (1u64 << 30) as f64)
        })
    };
    let r = job.report(|_, _| {}).await?;
    let seconds = started.elapsed().as_secs_f64();
    let during = reader.await??;
    let gib = r.bytes_rebuilt as f64 / (1u64 << 30) as f64;
    let (exact, failed, wrong) = check_all(setup, &client).await?;
    daemon.stop()?;
    // The replacement is now device 1 (recorded in the catalog).
    eprintln!(
        "rebuild: {gib:.2} GiB in {seconds:.1} s; streaming during it {during:.2} GiB/s vs {h_stream:.2}"
    );
    Ok(serde_json::json!({
        "bytes_rebuilt": r.bytes_rebuilt,
        "seconds": seconds,
        "seconds_per_gib": seconds / gib.max(1e-9),
        "units_lost": r.units_lost,
        "healthy_stream_gib_s": h_stream,
        "stream_during_rebuild_gib_s": during,
        "stream_ratio": during / h_stream,
        "after_objects_exact": exact,
        "after_read_errors": failed,
        "after_wrong_bytes": wrong,
    }))
}

/// Per-sample latencies (us) of random samples, 8 in flight.
async fn sample_latencies(setup: &Setup, daemon: &Daemon, seed: u64) -> anyhow::Result<Vec<f64>> {
    let client = Client::connect(&daemon.url).await?;
    let mut order = setup.samples.clone();
    let mut rng = Rng(seed | 1);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    drop_caches();
    Ok(sd::read_batch(daemon, &client, "train", &order, 8, true)
        .await?
        .latencies_us)
}

async fn scrub(setup: &Setup) -> anyhow::Result<serde_json::Value> {
    let daemon = setup.start(&[])?;
    let client = Client::connect(&daemon.url).await?;
    let mut rates = Vec::new();
    for _ in 0..setup.reps {
        drop_caches();
        let t0 = Instant::now();
        let r = scrub_once(&client, 100_000).await?;
        rates.push(Some(
            r.bytes_checked as f64 / t0.elapsed().as_secs_f64() / (1u64 << 30) as f64,
        ));
    }
    let (mut idle, mut busy) = (Vec::new(), Vec::new());
    for rep in 0..setup.reps.max(2) {
        let mut l = sample_latencies(setup, &daemon, rep as u64).await?;
        idle.push(percentile(&mut l, 0.99));
        // A scrub at the default rate (the server's 64 MiB/s) meanwhile.
        let c2 = client.clone();
        let scrubbing = tokio::spawn(async move { scrub_once(&c2, 0).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut l = sample_latencies(setup, &daemon, rep as u64 + 100).await?;
        busy.push(percentile(&mut l, 0.99));
        scrubbing.abort();
        // Wait for the running scrub to end before the next idle sample.
        while client.status().await?.scrub().running {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    daemon.stop()?;
    let (idle_p99, busy_p99) = (median(&idle).unwrap_or(0.0), median(&busy).unwrap_or(0.0));
    eprintln!("scrub: p99 {busy_p99:.0} us with scrub vs {idle_p99:.0} us idle");
    Ok(serde_json::json!({
        "scrub_gib_s_unthrottled": median(&rates).unwrap_or(0.0),
        "sample_p99_us_idle": idle_p99,
        "sample_p99_us_with_scrub_64mib_s": busy_p99,
        "p99_ratio": busy_p99 / idle_p99.max(1e-9),
    }))
}

/// Resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        << 10
}

/// A gRPC client on a connection of its own whose flow-control windows
/// stay at the HTTP/2 minimum, with `token`: a reader that stops reading.
async fn stingy(
    url: &str,
    token: &str,
) -> anyhow::Result<
    pb::storaged_client::StoragedClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl tonic::service::Interceptor + Clone,
        >,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await?;
    let auth: tonic::metadata::MetadataValue<_> = storaged_proto::auth::bearer(token).parse()?;
    Ok(pb::storaged_client::StoragedClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", auth.clone());
            Ok(r)
        },
    ))
}

/// Phase 5: see the module docs.
async fn hostile(setup: &Setup, work: &Path) -> anyhow::Result<serde_json::Value> {
    let victim_token = storaged_client::new_token()?;
    let hostile_token = storaged_client::new_token()?;
    let config = work.join("hostile.toml");
    std::fs::write(
        &config,
        format!(
            "stream_stall_timeout_s = 600\n\n[[tenant]]\nname = \"victim\"\ntokens_sha256 = [\"{}\"]\nread = [\"\"]\n\n[[tenant]]\nname = \"hostile\"\ntokens_sha256 = [\"{}\"]\nread = [\"\"]\n",
            storaged_proto::auth::token_sha256_hex(&victim_token),
            storaged_proto::auth::token_sha256_hex(&hostile_token)
        ),
    )?;
    let d = setup.start(&["--config".into(), config.display().to_string()])?;
    let victim = Client::connect_with(
        &d.url,
        &storaged_client::ConnectOptions {
            token: Some(victim_token),
            ..Default::default()
        },
    )
    .await?;
    let ds = victim.dataset("train")?;
    // Victim: each shard (16 MiB) read whole, one after another.
    let shard_latencies = |ds: storaged_client::Dataset| async move {
        let mut ms = Vec::new();
        for _ in 0..setup.reps.max(2) {
            for it in &setup.shards {
                let t0 = Instant::now();
                let got = ds.read(&it.path).await?;
                anyhow::ensure!(got.len() as u64 == it.size, "short read of {}", it.path);
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        anyhow::Ok(ms)
    };
    let mut idle = shard_latencies(ds.clone()).await?;
    let read = |path: &str| pb::ReadRequest {
        dataset: "train".into(),
        path: path.into(),
        offset: 0,
        length: None,
        dataset_id: None,
    };
    let mut held = Vec::new();
    let mut stalled = Vec::new();
    for c in 0..2 {
        let mut client = stingy(&d.url, &hostile_token).await?;
        for k in 0..25 {
            let it = &setup.shards[(c * 25 + k) % setup.shards.len()];
            stalled.push(client.read(read(&it.path)).await?.into_inner());
        }
        held.push(client);
    }
    let mut under_attack = shard_latencies(ds.clone()).await?;
    drop(stalled);
    drop(held);
    let p = |v: &mut Vec<f64>, q: f64| percentile(v, q).unwrap_or(f64::NAN);
    let (p50_idle, p50_attack) = (p(&mut idle, 0.5), p(&mut under_attack, 0.5));
    let (p99_idle, p99_attack) = (p(&mut idle, 0.99), p(&mut under_attack, 0.99));
    eprintln!(
        "victim shard read p50 {p50_idle:.1} ms idle, {p50_attack:.1} ms beside 50 stalled streams ({:.2}x)",
        p50_attack / p50_idle
    );

    // Amplification: huge and stalled batches, resident memory.
    let pid = d.pid();
    let rss_before = rss_bytes(pid);
    let shard = &setup.shards[0].path;
    let batch = |items: usize, any_order: bool| pb::ReadBatchRequest {
        dataset: "train".into(),
        items: (0..items)
            .map(|_| pb::ReadItem {
                path: shard.clone(),
                offset: 0,
                length: None,
            })
            .collect(),
        max_in_flight: 512,
        any_order,
        dataset_id: None,
    };
    let mut batches = Vec::new();
    let mut first_message_ms = 0.0;
    for (k, (items, any_order)) in [(100_000, false), (100_000, false), (48, true)]
        .into_iter()
        .enumerate()
    {
        let mut c = stingy(&d.url, &hostile_token).await?;
        let t0 = Instant::now();
        let mut s = c.read_batch(batch(items, any_order)).await?.into_inner();
        if k == 0 {
            // The first only: the others wait for the budget the first
            // holds (one tenant's calls share its budget).
            s.message().await?;
            first_message_ms = t0.elapsed().as_secs_f64() * 1e3;
        }
        batches.push((c, s));
    }
    let mut rss_peak = rss_before;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        rss_peak = rss_peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_status = Instant::now();
    victim.status().await?;
    let status_ms = t_status.elapsed().as_secs_f64() * 1e3;
    drop(batches);
    eprintln!(
        "RSS {} MiB -> peak {} MiB with two 100 000-item batches and a stalled 48-item any-order batch; Status {status_ms:.1} ms",
        rss_before >> 20,
        rss_peak >> 20
    );
    d.stop()?;
    Ok(serde_json::json!({
        "victim_shard_read_ms": {
            "idle_p50": p50_idle, "idle_p99": p99_idle,
            "stalled50_p50": p50_attack, "stalled50_p99": p99_attack,
            "p50_ratio": p50_attack / p50_idle,
        },
        "amplification": {
            "rss_before_mib": rss_before >> 20,
            "rss_peak_mib": rss_peak >> 20,
            "first_message_of_100k_item_batch_ms": first_message_ms,
            "status_ms": status_ms,
        },
    }))
}
