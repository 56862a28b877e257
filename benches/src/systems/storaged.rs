//! storaged over gRPC through the Rust client: the daemon process, ingest,
//! and the workloads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;
use storaged_client::region::RegionRead;
use storaged_client::{BatchItem, BulkTcp, Client, ConnectOptions, Plan, PlanSpec, PlanTail};

use super::{Item, pipeline_latencies_us, slot_latencies_us};
use crate::results::Measurement;
use crate::stats::{cpu_seconds, self_cpu_seconds};

/// A running storaged.
pub struct Daemon {
    child: Child,
    pub url: String,
    /// The Unix socket, for the shared-memory path.
    pub unix_url: String,
}

impl Daemon {
    pub fn start(
        bin: &Path,
        data_dir: &Path,
        devices: &[PathBuf],
        device_size: u64,
    ) -> anyhow::Result<Daemon> {
        Self::start_with(bin, data_dir, devices, device_size, &[])
    }

    /// [`start`](Self::start) with more `storaged serve` arguments.
    pub fn start_with(
        bin: &Path,
        data_dir: &Path,
        devices: &[PathBuf],
        device_size: u64,
        extra: &[String],
    ) -> anyhow::Result<Daemon> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--device-size".into(),
            device_size.to_string(),
        ];
        for d in devices {
            args.push("--device".into());
            args.push(d.display().to_string());
        }
        args.extend(extra.iter().cloned());
        let log = data_dir.with_extension("stderr.log");
        let launched = storaged::testkit::launch(
            bin,
            &args,
            &[],
            std::fs::File::create(&log)?,
            std::time::Duration::from_secs(600),
        )
        .with_context(|| format!("storaged did not start; see {}", log.display()))?;
        Ok(Daemon {
            url: format!("http://{}", launched.addr),
            unix_url: format!("unix://{}", data_dir.join("storaged.sock").display()),
            child: launched.child,
        })
    }

    /// A stand-in while the real daemon restarts: a finished `true`
    /// process, never measured.
    pub fn placeholder() -> Daemon {
        let mut child = Command::new("true").spawn().expect("running true(1)");
        let _ = child.wait();
        Daemon {
            child,
            url: String::new(),
            unix_url: String::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        Ok(())
    }

    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or(0.0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tenant with a token, and TLS with certificates made here (rcgen):
/// what the `tls` workload runs the daemon with.
pub struct TlsSetup {
    config: PathBuf,
    /// The same tenant and token without TLS (what authentication alone
    /// costs).
    token_config: PathBuf,
    ca: PathBuf,
    token: String,
}

impl TlsSetup {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "storaged-bench CA");
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let key = KeyPair::generate()?;
        let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
            .signed_by(&key, &Issuer::from_params(&ca, &ca_key))?;
        let w = |name: &str, text: String| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        let ca_path = w("ca.pem", ca_pem)?;
        let cert = w("server.pem", server.pem())?;
        let key_path = w("server.key", key.serialize_pem())?;
        let token = storaged_client::new_token()?;
        let tenant = format!(
            "[[tenant]]\nname = \"bench\"\ntokens_sha256 = [\"{}\"]\nread = [\"\"]\n",
            storaged_proto::auth::token_sha256_hex(&token)
        );
        let config = w(
            "storaged.toml",
            format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n\n{tenant}",
                cert.display(),
                key_path.display(),
            ),
        )?;
        let token_config = w("storaged-token-only.toml", tenant)?;
        Ok(Self {
            config,
            token_config,
            ca: ca_path,
            token,
        })
    }

    /// `storaged serve` arguments: tenant and token, with TLS or without.
    pub fn daemon_args(&self, tls: bool) -> Vec<String> {
        let config = if tls {
            &self.config
        } else {
            &self.token_config
        };
        vec!["--config".into(), config.display().to_string()]
    }

    /// A client of the daemon at `url` (given as http://) with the token,
    /// over TLS or not.
    pub async fn client(&self, url: &str, tls: bool) -> anyhow::Result<Client> {
        let url = if tls {
            url.replacen("http://", "https://", 1)
        } else {
            url.to_owned()
        };
        Ok(Client::connect_with(
            &url,
            &storaged_client::ConnectOptions {
                token: Some(self.token.clone()),
                tls_ca: tls.then(|| self.ca.clone()),
                ..Default::default()
            },
        )
        .await?)
    }
}

/// Where a dataset lives on each device: `(offset, length)` of the device
/// byte range that holds it, from the device extents of its first and last
/// objects (objects are packed in path order, whatever the storage class),
/// widened to whole stripe units.
pub async fn device_region(
    client: &Client,
    dataset: &str,
    first: &str,
    last: &str,
) -> anyhow::Result<(u64, u64)> {
    let status = client.status().await?;
    let ds = client.dataset(dataset)?;
    let a = ds.stat(first).await?;
    let b = ds.stat(last).await?;
    let unit = u64::from(status.stripe_unit_bytes);
    let lo = a
        .extents
        .iter()
        .map(|e| e.device_offset / unit * unit)
        .min()
        .context("first object has no extents")?;
    let hi = b
        .extents
        .iter()
        .map(|e| (e.device_offset + e.length).next_multiple_of(unit))
        .max()
        .context("last object has no extents")?;
    Ok((lo, hi.saturating_sub(lo).max(unit)))
}

/// Whole objects, `concurrency` streams pulling from a shared queue.
pub async fn stream_objects(
    daemon: &Daemon,
    client: &Client,
    dataset: &str,
    items: &[Item],
    concurrency: u32,
) -> anyhow::Result<Measurement> {
    let ds = client.dataset(dataset)?;
    let items = Arc::new(items.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let (srv0, cli0, t0) = (daemon.cpu_seconds(), self_cpu_seconds(), Instant::now());
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (ds, items, next) = (ds.clone(), Arc::clone(&items), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(item) = items.get(i) else { break };
                let mut s = std::pin::pin!(ds.read_stream(&item.path, 0, None));
                while let Some(chunk) = s.next().await {
                    bytes += chunk?.len() as u64;
                }
            }
            Ok::<u64, storaged_client::ClientError>(bytes)
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await??;
    }
    Ok(stream_measurement(daemon, &items, bytes, t0, (srv0, cli0)))
}

/// A streaming run's figures: bytes, objects, time and CPU since the
/// `(server, client)` CPU readings taken at `t0`.
fn stream_measurement(
    daemon: &Daemon,
    items: &[Item],
    bytes: u64,
    t0: Instant,
    (srv0, cli0): (f64, f64),
) -> Measurement {
    Measurement {
        bytes,
        samples: items.len() as u64,
        seconds: t0.elapsed().as_secs_f64(),
        cpu_s_server: Some(daemon.cpu_seconds() - srv0),
        cpu_s_client: Some(self_cpu_seconds() - cli0),
        ..Default::default()
    }
}

/// The shared-memory stream: each stream runs 12 readers, each with its own
/// 16 MiB region and calls of 16 × 1 MiB pieces. A reader waits for the
/// slowest item of its call before reusing its region, so many readers are
/// needed to keep the devices busy (BENCHMARKS.md has the sweep).
const SHM_WINDOW_BYTES: u64 = 16 << 20;
const SHM_PIECE_BYTES: u64 = 1 << 20;
const SHM_READERS_PER_STREAM: u32 = 12;

/// The shm reader shape: `STORAGED_BENCH_SHM=READERS,WINDOW_MIB,PIECE_KIB`
/// overrides the defaults above, for sweeps (BENCHMARKS.md).
fn shm_shape() -> (u32, u64, u64) {
    let default = (SHM_READERS_PER_STREAM, SHM_WINDOW_BYTES, SHM_PIECE_BYTES);
    let Ok(v) = std::env::var("STORAGED_BENCH_SHM") else {
        return default;
    };
    let f: Vec<u64> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    match f[..] {
        [r, w, p] if r > 0 && w > 0 && p > 0 && p * 1024 <= w << 20 => (r as u32, w << 20, p << 10),
        _ => {
            eprintln!("STORAGED_BENCH_SHM={v:?} ignored: expected READERS,WINDOW_MIB,PIECE_KIB");
            default
        }
    }
}

/// A client of `daemon` on TCP that reads over gRPC only (`BulkTcp::Off`),
/// or only over the TCP bulk channel (`Required`).
pub async fn tcp_client(daemon: &Daemon, bulk_tcp: BulkTcp) -> anyhow::Result<Client> {
    let options = ConnectOptions {
        bulk_tcp,
        ..Default::default()
    };
    Ok(Client::connect_with(&daemon.url, &options).await?)
}

/// Whole objects through the shared-memory path: the device writes into
/// this process's registered regions, verified in place, nothing copied.
/// Readers pull 16 MiB windows of the shards from one shared queue.
pub async fn stream_objects_shm(
    daemon: &Daemon,
    dataset: &str,
    items: &[Item],
    concurrency: u32,
) -> anyhow::Result<Measurement> {
    let client = Client::connect(&daemon.unix_url).await?;
    stream_objects_into_regions(daemon, &client, dataset, items, concurrency).await
}

/// Whole objects over the TCP bulk channel: the same readers and windows
/// as the shared-memory stream, each window received into this process's
/// own region and checked here against the CRCs sent with it.
pub async fn stream_objects_bulk(
    daemon: &Daemon,
    dataset: &str,
    items: &[Item],
    concurrency: u32,
) -> anyhow::Result<Measurement> {
    let client = tcp_client(daemon, BulkTcp::Required).await?;
    stream_objects_into_regions(daemon, &client, dataset, items, concurrency).await
}

/// Whole objects read into `client`'s regions (shared ones on the same
/// host, its own over the TCP bulk channel).
async fn stream_objects_into_regions(
    daemon: &Daemon,
    client: &Client,
    dataset: &str,
    items: &[Item],
    concurrency: u32,
) -> anyhow::Result<Measurement> {
    let ds = client.dataset(dataset)?;
    let (readers, window_bytes, piece_bytes) = shm_shape();
    // (object, window start) pairs in order; readers take the next one.
    let windows: Vec<(Item, u64)> = items
        .iter()
        .flat_map(|i| {
            (0..i.size.div_ceil(window_bytes)).map(move |w| (i.clone(), w * window_bytes))
        })
        .collect();
    let windows = Arc::new(windows);
    let next = Arc::new(AtomicUsize::new(0));
    let registered_before = client.status().await?.regions().registered;
    let mut regions = Vec::new();
    for _ in 0..concurrency * readers {
        regions.push(client.register_region(window_bytes).await?);
    }
    // storaged pins each region (io_uring fixed buffer) in the background;
    // that is setup, as the registration is, so it is let finish before
    // the clock starts (up to 10 s: an unprivileged storaged may not pin).
    // Only these regions may be registered then: an earlier run's, still
    // being torn down, would count as fixed in their place.
    let wanted = regions.len() as u32;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while regions.iter().any(storaged_client::Region::is_shared) {
        let s = client.status().await?;
        if (s.regions().registered == wanted && s.regions().fixed >= wanted)
            || Instant::now() >= deadline
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (srv0, cli0, t0) = (daemon.cpu_seconds(), self_cpu_seconds(), Instant::now());
    let mut tasks = Vec::new();
    for mut region in regions {
        let (ds, windows, next) = (ds.clone(), Arc::clone(&windows), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some((item, start)) = windows.get(k) else {
                    break;
                };
                let end = (start + window_bytes).min(item.size);
                let reads: Vec<RegionRead> = (*start..end)
                    .step_by(piece_bytes as usize)
                    .map(|at| RegionRead {
                        path: item.path.clone(),
                        offset: at,
                        length: Some(piece_bytes.min(end - at)),
                        object_size: item.size,
                    })
                    .collect();
                let batch = ds.read_into(&mut region, &reads).await?;
                for i in 0..batch.len() {
                    bytes += batch
                        .get(i)
                        .map_err(|s| anyhow::anyhow!("{}: {}", item.path, s.message()))?
                        .len() as u64;
                }
            }
            // Kept until the clock stops: a loader keeps its regions for
            // the whole job, and unmapping them (storaged frees the pages
            // of the last mapping) is teardown, not streaming.
            Ok::<_, anyhow::Error>((bytes, region))
        }));
    }
    let mut bytes = 0;
    let mut regions = Vec::new();
    for t in tasks {
        let (b, region) = t.await??;
        bytes += b;
        regions.push(region);
    }
    let m = stream_measurement(daemon, items, bytes, t0, (srv0, cli0));
    let shared = regions.iter().any(storaged_client::Region::is_shared);
    drop(regions);
    // storaged unpins and frees them in the background: let it finish
    // (up to 10 s) so the next system measured does not pay for it.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while shared
        && client.status().await?.regions().registered > registered_before
        && Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let expected: u64 = items.iter().map(|i| i.size).sum();
    if bytes != expected {
        bail!("region stream read {bytes} bytes of {expected}");
    }
    Ok(m)
}

/// Samples per loader batch and data-loader workers, as a PyTorch job
/// would run them.
pub const LOADER_BATCH_SAMPLES: usize = 256;
pub const LOADER_WORKERS: u32 = 4;
/// Read-ahead budget of each worker's loader.
const LOADER_PREFETCH_BYTES: u64 = 64 << 20;

/// The whole dataset through `LOADER_WORKERS` loaders (the second epoch of
/// a plan shuffled in blocks of `block_size`, 1 being the uniform default,
/// one rank), connected at `url`: over TCP the loader uses gRPC (with
/// read-ahead `hints` or without) or, with `bulk_tcp`, the TCP bulk
/// channel; over the Unix socket the zero-copy path. Every sample's
/// length is checked against the listing.
pub async fn loader_epoch(
    daemon: &Daemon,
    url: &str,
    bulk_tcp: BulkTcp,
    dataset: &str,
    hints: bool,
    block_size: u32,
) -> anyhow::Result<Measurement> {
    let options = ConnectOptions {
        bulk_tcp,
        ..Default::default()
    };
    let client = Client::connect_with(url, &options).await?;
    let ds = client.dataset(dataset)?;
    let listing: Arc<[storaged_client::ObjectInfo]> = ds.list("").await?.into();
    // Epoch 0 sets the job up (connections; on the shm path the regions,
    // whose pages are faulted in and pinned once) and is not timed: a
    // training job pays that once, and on this small dataset it would
    // dominate. Epoch 1, a different shuffle, is measured.
    run_loader_epoch(&ds, &listing, 0, hints, block_size).await?;
    let (srv0, cli0, t0) = (daemon.cpu_seconds(), self_cpu_seconds(), Instant::now());
    let (bytes, samples) = run_loader_epoch(&ds, &listing, 1, hints, block_size).await?;
    let mut m = stream_measurement(daemon, &[], bytes, t0, (srv0, cli0));
    m.samples = samples;
    Ok(m)
}

/// One epoch through `LOADER_WORKERS` loaders; returns (bytes, samples)
/// after checking every sample's length against the listing.
async fn run_loader_epoch(
    ds: &storaged_client::Dataset,
    listing: &Arc<[storaged_client::ObjectInfo]>,
    epoch: u64,
    hints: bool,
    block_size: u32,
) -> anyhow::Result<(u64, u64)> {
    let mut tasks = Vec::new();
    for worker in 0..LOADER_WORKERS {
        let spec = PlanSpec {
            seed: 42,
            epoch,
            rank: 0,
            world_size: 1,
            worker,
            num_workers: LOADER_WORKERS,
            shuffle: true,
            block_size,
            tail: PlanTail::Pad,
        };
        let plan = Plan::new(Arc::clone(listing), spec, None)?;
        let options = storaged_client::LoaderOptions {
            hints,
            ..Default::default()
        };
        let mut loader =
            ds.loader_with(plan, LOADER_BATCH_SAMPLES, LOADER_PREFETCH_BYTES, options)?;
        let listing = Arc::clone(listing);
        tasks.push(tokio::spawn(async move {
            let (mut bytes, mut samples) = (0u64, 0u64);
            while let Some(batch) = loader.next().await {
                for s in batch?.samples {
                    let want = listing[s.object_index as usize].size;
                    if s.data.len() as u64 != want {
                        bail!("{}: {} bytes, listed {want}", s.path, s.data.len());
                    }
                    bytes += want;
                    samples += 1;
                }
            }
            Ok::<(u64, u64), anyhow::Error>((bytes, samples))
        }));
    }
    let (mut bytes, mut samples) = (0, 0);
    for t in tasks {
        let (b, n) = t.await??;
        bytes += b;
        samples += n;
    }
    Ok((bytes, samples))
}

/// Random samples through one ReadBatch with `concurrency` items in flight,
/// delivered in request order or, with `any_order`, as they complete.
pub async fn read_batch(
    daemon: &Daemon,
    client: &Client,
    dataset: &str,
    items: &[Item],
    concurrency: u32,
    any_order: bool,
) -> anyhow::Result<Measurement> {
    let ds = client.dataset(dataset)?;
    let batch: Vec<BatchItem> = items
        .iter()
        .map(|i| BatchItem {
            path: i.path.clone(),
            offset: 0,
            length: None,
        })
        .collect();
    let (srv0, cli0, t0) = (daemon.cpu_seconds(), self_cpu_seconds(), Instant::now());
    let mut done_at = Vec::with_capacity(items.len());
    let mut indices = Vec::with_capacity(items.len());
    let mut bytes = 0u64;
    let mut s = if any_order {
        ds.read_batch_any_order(batch, concurrency).boxed()
    } else {
        ds.read_batch(batch, concurrency).boxed()
    };
    while let Some(r) = s.next().await {
        let r = r?;
        let data = r
            .data
            .map_err(|e| anyhow::anyhow!("item {}: {e}", r.index))?;
        bytes += data.len() as u64;
        done_at.push(t0.elapsed().as_secs_f64() * 1e6);
        indices.push(r.index);
    }
    let seconds = t0.elapsed().as_secs_f64();
    if done_at.len() != items.len() {
        bail!(
            "ReadBatch returned {} of {} items",
            done_at.len(),
            items.len()
        );
    }
    Ok(Measurement {
        bytes,
        samples: items.len() as u64,
        seconds,
        latencies_us: if any_order {
            slot_latencies_us(&done_at, &indices, concurrency as usize)
        } else {
            pipeline_latencies_us(&done_at, concurrency as usize)
        },
        cpu_s_server: Some(daemon.cpu_seconds() - srv0),
        cpu_s_client: Some(self_cpu_seconds() - cli0),
        ..Default::default()
    })
}

/// Creates a dataset of `n` empty objects through a raw Ingest stream.
pub async fn ingest_empty_objects(client: &Client, dataset: &str, n: usize) -> anyhow::Result<()> {
    use storaged_proto::pb::{self, ingest_request::Msg};
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut rpc = client.raw();
    let call = tokio::spawn(async move {
        rpc.ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let m = |msg| pb::IngestRequest { msg: Some(msg) };
    let send = |r| {
        let tx = tx.clone();
        async move {
            tx.send(r)
                .await
                .map_err(|_| anyhow::anyhow!("ingest stream closed"))
        }
    };
    send(m(Msg::Begin(pb::IngestBegin {
        dataset: dataset.into(),
        storage_class: 0,
        ec_data_units: 0,
        ec_parity_units: 0,
        cluster_unit: false,
    })))
    .await?;
    for i in 0..n {
        send(m(Msg::Object(pb::ObjectBegin {
            path: list_path(i),
            size: 0,
            crc32: None,
        })))
        .await?;
    }
    send(m(Msg::Commit(pb::IngestCommit {
        object_count: n as u64,
        total_bytes: 0,
    })))
    .await?;
    drop(tx);
    call.await??;
    Ok(())
}

/// Path of listing object `i`: 1000 class directories, like ImageNet.
pub fn list_path(i: usize) -> String {
    format!("train/n{:05}/img_{i:08}.JPEG", i % 1000)
}

/// Time to list every object (pages of 10 000), and stat latencies.
pub async fn list_and_stat(
    daemon: &Daemon,
    client: &Client,
    dataset: &str,
    n: usize,
    stats: usize,
) -> anyhow::Result<(Measurement, Measurement)> {
    let ds = client.dataset(dataset)?;
    let (srv0, cli0, t0) = (daemon.cpu_seconds(), self_cpu_seconds(), Instant::now());
    let mut token = String::new();
    let mut count = 0usize;
    loop {
        let (objs, next) = ds.list_page("", 10_000, &token).await?;
        count += objs.len();
        match next {
            Some(t) => token = t,
            None => break,
        }
    }
    let list = Measurement {
        samples: count as u64,
        seconds: t0.elapsed().as_secs_f64(),
        cpu_s_server: Some(daemon.cpu_seconds() - srv0),
        cpu_s_client: Some(self_cpu_seconds() - cli0),
        ..Default::default()
    };
    if count != n {
        bail!("listed {count} objects, expected {n}");
    }
    let mut rng = crate::datasets::Rng::new(99);
    let mut lat = Vec::with_capacity(stats);
    let t1 = Instant::now();
    for _ in 0..stats {
        let p = list_path(rng.below(n));
        let t = Instant::now();
        ds.stat(&p).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let stat = Measurement {
        samples: stats as u64,
        seconds: t1.elapsed().as_secs_f64(),
        latencies_us: lat,
        ..Default::default()
    };
    Ok((list, stat))
}
