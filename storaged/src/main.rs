//! `storaged`: the daemon binary. Parses flags, sets up logging and the
//! runtime, opens the store and serves until SIGINT or SIGTERM.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;
use storaged::config::{ServeConfig, ServeFlags};

use storaged::audit::AuditLog;
use storaged::dirlock::DataDirLock;
use storaged::service::Access;
use storaged::store::Store;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "storaged",
    version,
    about = "Striped io_uring storage for AI training data, served over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon. With no --device it uses 4 sparse file-backed devices
    /// under the data dir.
    Serve {
        // Boxed: the flags are most of the enum's size.
        #[command(flatten)]
        flags: Box<ServeFlags>,
        /// Print the configuration these flags and the config file give,
        /// every key with the value in force (secrets redacted), as a
        /// config file, and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Rebuild DATA_DIR/catalog.redb from the pool's devices alone (their
    /// roots and manifests), opening them read-only. Devices may come in
    /// any order and absent ones may be left out. An existing catalog is
    /// moved aside, never deleted. storaged serve does this by itself when
    /// its catalog is missing or behind the devices.
    Recover {
        /// Where to write catalog.redb.
        #[arg(long)]
        data_dir: PathBuf,
        /// A device of the pool (repeat).
        #[arg(long = "device", required = true)]
        devices: Vec<PathBuf>,
        /// Only report what the devices hold; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() {
    if let Err(e) = run() {
        // Each cause once: libraries often repeat their source's message.
        let mut text = String::new();
        for cause in e.chain() {
            let part = cause.to_string();
            if text.is_empty() {
                text = part;
            } else if !text.contains(&part) {
                text.push_str(": ");
                text.push_str(&part);
            }
        }
        eprintln!("storaged: error: {text}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve {
            flags,
            print_config,
        } => {
            let cfg = ServeConfig::resolve(*flags)?;
            if print_config {
                print!("{}", cfg.effective_toml()?);
                return Ok(());
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.worker_threads)
                .thread_name("storaged-rt")
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            rt.block_on(serve(cfg))
        }
        Command::Recover {
            data_dir,
            devices,
            dry_run,
        } => recover(&data_dir, &devices, dry_run),
    }
}

fn recover(data_dir: &std::path::Path, devices: &[PathBuf], dry_run: bool) -> anyhow::Result<()> {
    // A running storaged owns the data dir; recovering under it would
    // race its catalog.
    let _dir_lock = if dry_run {
        None
    } else {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        Some(DataDirLock::acquire(data_dir)?)
    };
    let r = storaged::recover::recover(data_dir, devices, dry_run)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "pool {} (root generation {})", r.pool_id, r.generation)?;
    for (i, p) in &r.devices {
        writeln!(out, "  device {i}: {}", p.display())?;
    }
    for i in &r.missing {
        writeln!(out, "  device {i}: not given (missing)")?;
    }
    writeln!(out, "{} datasets:", r.datasets.len())?;
    for (name, rec) in &r.datasets {
        writeln!(
            out,
            "  {name}  {}  {} objects  {} bytes  id {}",
            rec.class, rec.object_count, rec.total_bytes, rec.id
        )?;
    }
    if let Some(aside) = &r.moved_aside {
        writeln!(out, "the previous catalog was moved to {}", aside.display())?;
    }
    match &r.catalog {
        Some(p) => writeln!(out, "wrote {}", p.display())?,
        None => writeln!(out, "dry run: nothing written")?,
    }
    Ok(())
}

async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    if let Some(why) = cfg.exposure() {
        // Only with --insecure (validation refuses it otherwise).
        tracing::warn!(listen = %cfg.listen, "INSECURE: {why}");
        eprintln!(
            "storaged: WARNING: --insecure: listening on {}: {why}",
            cfg.listen
        );
    }
    let audit = match &cfg.audit_log {
        Some(path) => AuditLog::open(path, cfg.audit_required)?,
        None => AuditLog::disabled(),
    };
    let tls = cfg.tls.as_ref().map(|t| t.server_config()).transpose()?;
    if let Some(t) = &cfg.tls {
        tracing::info!(
            cert = %t.cert.display(),
            client_certificates = if t.client_ca.is_some() { "required" } else { "not asked for" },
            "TLS on TCP"
        );
    }
    let access = Access {
        tenants: Arc::clone(&cfg.tenants),
        audit: Arc::new(audit),
        tls,
    };
    if access.tenants.enabled() {
        tracing::info!(
            tenants = access.tenants.list().len(),
            "callers must authenticate"
        );
    } else {
        tracing::info!("no tenants configured: every caller is the operator");
    }
    // Nothing is written before the port is known to be ours: a port in
    // use fails here, before the data dir or any device file exists.
    let tcp = storaged::server::bind_tcp(cfg.listen).await?;
    let metrics_listener = match cfg.metrics {
        Some(addr) => Some(storaged::metrics::endpoint::bind(addr).await?),
        None => None,
    };
    let _dir_lock = DataDirLock::acquire(&cfg.store.data_dir)?;
    let endpoints = storaged::server::Endpoints {
        tcp: cfg.listen,
        bulk_tcp: cfg.bulk_listen,
        unix: cfg.unix.clone(),
        unix_access: cfg.unix_access.clone(),
    };
    let mut listeners = storaged::server::Listeners::with_tcp(tcp, &endpoints)?;
    if let Some(listener) = metrics_listener {
        // Before the store opens: its device metrics record into it.
        listeners = listeners.with_metrics(listener, storaged::metrics::install()?);
    }
    let store = Store::open(&cfg.store)?;
    storaged::store::scrub::spawn_background(&store);
    let member = match &cfg.cluster {
        Some(settings) => Some(join_cluster(settings, &cfg, &store, &listeners).await?),
        None => None,
    };
    let heartbeats = member.as_ref().zip(cfg.cluster.as_ref()).map(|(m, c)| {
        let interval = std::time::Duration::from_secs(c.sweep_interval_s);
        let sweep =
            storaged::cluster::registry::sweep_forever(Arc::clone(m), Arc::clone(&store), interval);
        // Off when it has nothing to do: members down stay down until an
        // operator drains them, and data stays where it was put.
        let options = storaged::cluster::repair::RepairOptions {
            rebuild_after: std::time::Duration::from_secs(c.rebuild_after_s),
            rebalance: c.rebalance,
        };
        let repair = (c.rebuild_after_s > 0 || c.rebalance).then(|| {
            tokio::spawn(storaged::cluster::repair::repair_forever(
                Arc::clone(m),
                options,
                interval,
            ))
        });
        (
            tokio::spawn(Arc::clone(m).heartbeats()),
            tokio::spawn(sweep),
            repair,
        )
    });
    // The handlers are installed now, before READY is announced: a
    // SIGTERM that follows READY at once must stop storaged cleanly, not
    // kill it with the default action.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
        // systemd (Type=notify) learns the stop is under way.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    };
    let served = storaged::server::serve(
        storaged::server::Node {
            store,
            cluster: member.clone(),
        },
        listeners,
        cfg.regions,
        access,
        &cfg.server,
        shutdown,
        |bound| {
            // Tests and scripts read this line to learn the port.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "storaged listening on {bound}");
            let _ = out.flush();
            // systemd (Type=notify) starts what depends on storaged now;
            // without NOTIFY_SOCKET this does nothing.
            let _ = sd_notify::notify(
                false,
                &[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status(&format!("serving on {bound}")),
                ],
            );
        },
    )
    .await;
    if let Some((heartbeat, sweep, repair)) = heartbeats {
        heartbeat.abort();
        sweep.abort();
        if let Some(repair) = repair {
            repair.abort();
        }
    }
    if let Some(m) = &member {
        // Seen down at once, not after the lease's time to live.
        m.leave().await;
    }
    served?;
    Ok(())
}

/// Joins the cluster of `settings` (or rejoins it) before serving: the
/// node's identity is checked and its liveness key taken, or storaged
/// exits saying why.
async fn join_cluster(
    settings: &storaged::config::ClusterSettings,
    cfg: &ServeConfig,
    store: &Arc<Store>,
    listeners: &storaged::server::Listeners,
) -> anyhow::Result<Arc<storaged::cluster::Member>> {
    use storaged::cluster::{EtcdControl, Member, MemberConfig};
    let control = EtcdControl::new(
        &settings.url,
        std::time::Duration::from_secs(settings.request_timeout_s),
    )?;
    let advertise = match &settings.advertise {
        Some(a) => a.clone(),
        None => listeners.tcp_addr()?.to_string(),
    };
    let tls = cfg
        .tls
        .as_ref()
        .zip(settings.peer_ca.as_ref())
        .map(|(t, ca)| (ca.as_path(), t.cert.as_path(), t.key.as_path()));
    let peers = storaged::cluster::peer::PeerLink::new(
        settings.peer_token.as_ref().map(|t| t.0.as_str()),
        tls,
    )?;
    let config = MemberConfig {
        peers,
        rebuild_after_s: settings.rebuild_after_s,
        cluster_name: settings.cluster_name.clone(),
        node_id: settings.node_id.clone(),
        advertise,
        bulk_advertise: listeners.bulk_tcp_addr()?.map(|a| a.to_string()),
        lease_ttl_s: settings.lease_ttl_s,
        data_dir: cfg.store.data_dir.clone(),
        pool_id: store.status().pool_id,
    };
    let usage = {
        let store = Arc::clone(store);
        Box::new(move || store.capacity_and_used_bytes())
    };
    let member = Member::join(Arc::new(control), config, usage)
        .await
        .with_context(|| {
            format!(
                "joining cluster {:?} at {} as node {:?}",
                settings.cluster_name, settings.url, settings.node_id
            )
        })?;
    tracing::info!(
        cluster = %member.cluster_name(),
        cluster_id = %member.cluster_id(),
        node = %member.node_id(),
        control_plane = %member.control_endpoint(),
        "in the cluster"
    );
    Ok(member)
}
