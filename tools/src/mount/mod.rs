//! `storagectl mount`: every dataset (or one) as a read-only POSIX tree,
//! through FUSE (the `fuser` crate, pure Rust: no libfuse needed; as root
//! it mounts with mount(2), otherwise through `fusermount3`).
//!
//! The mount runs in the foreground until it is unmounted (`umount`,
//! `fusermount3 -u`) or gets SIGINT/SIGTERM, which unmount it cleanly
//! (lazily when something still uses it). A mount whose process died
//! leaves a dead mount point; the next mount at that path detaches it
//! first. Metadata comes from `namespace` and `index`, data from `reader`:
//! exact reads on the kernel's own thread when storaged is on this host
//! (`direct`), read-ahead windows and remote reads on the runtime
//! (concurrent small reads of a dataset leave together: `batch`); `fs`
//! answers the kernel.

mod batch;
mod direct;
mod fs;
mod index;
mod namespace;
mod ops;
mod reader;
mod ring;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use storaged_client::Client;

/// The options of `storagectl mount`.
#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Where to mount (an existing directory).
    pub mountpoint: PathBuf,
    /// Mount only this dataset, at the root. [default: every dataset, each
    /// a top-level directory]
    #[arg(long)]
    pub dataset: Option<String>,
    /// Threads taking requests from the kernel (each with its own
    /// /dev/fuse descriptor). On the same host each serves exact reads
    /// itself, one at a time (a memory region each); read-ahead and
    /// remote reads run concurrently on the runtime.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Seconds after which a dataset created or removed while mounted
    /// shows at the top level.
    #[arg(long, default_value_t = 5)]
    pub refresh_s: u64,
    /// Seconds the kernel keeps entries and attributes inside a dataset
    /// (datasets never change).
    #[arg(long, default_value_t = 3600)]
    pub attr_ttl_s: u64,
    /// Largest read-ahead window of one sequentially read file, in MiB.
    #[arg(long, default_value_t = 8)]
    pub read_ahead_mib: u64,
    /// Read-ahead of all open files together, in MiB.
    #[arg(long, default_value_t = 256)]
    pub read_ahead_budget_mib: u64,
    /// Requests to storaged at once (on the same host each holds a
    /// memory region; storaged allows 64 per user by default).
    #[arg(long, default_value_t = 32)]
    pub fetches_max: usize,
    /// Objects and directories one dataset's index may hold.
    #[arg(long, default_value_t = 20_000_000)]
    pub index_entries_max: usize,
    /// Seconds a read waits for storaged to come back (a restart) before
    /// it fails with EIO.
    #[arg(long, default_value_t = 60)]
    pub retry_budget_s: u64,
    /// The kernel's read-ahead for the mount, in KiB (its own default is
    /// 128: 128 KiB requests to this process); 0 leaves it. Needs root.
    #[arg(long, default_value_t = 4096)]
    pub kernel_read_ahead_kib: u64,
    /// Files up to this size, in MiB, go through the kernel's page cache
    /// (a reopen or a second epoch reads them from memory); larger ones
    /// are read straight into the reader's buffer (no page-cache copy;
    /// the mount's own windows read ahead), the way shards are streamed.
    #[arg(long, default_value_t = 16)]
    pub cache_files_up_to_mib: u64,
    /// Read-ahead requests the kernel keeps outstanding to the mount (its
    /// `max_background`): about how many cold small files many readers
    /// fetch at once.
    #[arg(long, default_value_t = 256)]
    pub kernel_background_max: u16,
    /// Serve every read on the runtime, also on the same host (exact reads
    /// otherwise go from the kernel's thread straight to storaged: fewer
    /// thread wakeups; this is for comparing the two).
    #[arg(long)]
    pub no_direct_reads: bool,
    /// Take the kernel's requests through FUSE over io_uring: one queue
    /// per CPU, each request answered on its caller's CPU (Linux 6.14+
    /// with the fuse module's `enable_uring` set: `echo 1 >
    /// /sys/module/fuse/parameters/enable_uring`). `on` fails the mount
    /// where the kernel does not offer it, `auto` uses it where it does,
    /// `off` reads /dev/fuse (measured as fast or faster on a 2-CPU VM;
    /// BENCHMARKS.md, "The mount, sixth pass").
    #[arg(long, value_enum, default_value_t = FuseIoUring::Off)]
    pub fuse_io_uring: FuseIoUring,
    /// Let other users (and root) use the mount (needs `user_allow_other`
    /// in /etc/fuse.conf unless run as root).
    #[arg(long)]
    pub allow_other: bool,
}

/// Whether the mount takes requests through FUSE over io_uring.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuseIoUring {
    Auto,
    On,
    Off,
}

/// Mounts, serves until unmounted or signalled, and unmounts.
pub async fn run(client: Client, args: MountArgs) -> anyhow::Result<()> {
    if args.threads == 0 || args.read_ahead_mib == 0 {
        bail!("--threads and --read-ahead-mib must be at least 1");
    }
    let mountpoint = args.mountpoint.clone();
    if args.fuse_io_uring == FuseIoUring::On && !ring::offered() {
        bail!("{}", ring_refused());
    }
    detach_dead_mount(&mountpoint)?;
    let meta = std::fs::metadata(&mountpoint)
        .with_context(|| format!("mount point {}", mountpoint.display()))?;
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    // Before mounting: a signal that comes as soon as the mount is ready
    // must find its handler in place.
    let signals = StopSignals::new().context("installing the SIGINT/SIGTERM handlers")?;
    let runtime = tokio::runtime::Handle::current();
    let retry_budget = Duration::from_secs(args.retry_budget_s);
    let refresh = Duration::from_secs(args.refresh_s);
    let ns_options = namespace::NamespaceOptions {
        dataset: args.dataset.clone(),
        refresh,
        entries_max: args.index_entries_max.max(1),
        retry_budget,
    };
    // Exact reads on the kernel's threads where storaged is on this host
    // (`direct`), unless asked not to.
    let direct = (client.is_local() && !args.no_direct_reads).then(|| {
        direct::DirectReads::new(client.clone(), runtime.clone(), retry_budget, args.threads)
    });
    let reader = Arc::new(reader::Reader::new(
        runtime.clone(),
        reader::ReadAheadOptions {
            window_bytes_max: args.read_ahead_mib << 20,
            budget_bytes: args.read_ahead_budget_mib << 20,
            retry_budget,
            fetches_max: args.fetches_max,
        },
        direct,
    ));
    let (ns_client, rt) = (client.clone(), runtime.clone());
    let ns =
        tokio::task::spawn_blocking(move || namespace::Namespace::new(ns_client, rt, ns_options))
            .await??;
    let path = if client.is_local() { "shm" } else { "grpc" };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let ready = Box::new(move || {
        let _ = ready_tx.send(());
    });
    let fs = fs::MountFs::new(
        ns,
        reader,
        client,
        runtime,
        fs::MountFsOptions {
            attr_ttl: Duration::from_secs(args.attr_ttl_s),
            refresh,
            cached_file_bytes_max: args.cache_files_up_to_mib.saturating_mul(1 << 20),
            kernel_background_max: args.kernel_background_max,
            offer_io_uring: args.fuse_io_uring != FuseIoUring::Off,
        },
        ready,
    );
    let core = fs.core();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("storaged".into()),
        fuser::MountOption::Subtype("storaged".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
        fuser::MountOption::DefaultPermissions,
    ];
    if args.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(args.threads);
    config.clone_fd = true;
    let mp = mountpoint.clone();
    let mut session = tokio::task::spawn_blocking(move || fuser::Session::new(fs, &mp, &config))
        .await?
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
    let dev = std::os::fd::AsFd::as_fd(&session)
        .try_clone_to_owned()
        .context("duplicating the /dev/fuse descriptor")?;
    let mut unmounter = session.unmount_callable();
    let detach_at = mountpoint.clone();
    tokio::spawn(async move {
        let why = signals.next().await;
        tracing::info!(signal = why, "unmounting");
        if let Err(e) = unmounter.unmount() {
            // Busy (a process still has a file or its cwd there): detach
            // now, the kernel finishes when the last user lets go.
            tracing::warn!(error = %e, "unmount failed; detaching lazily");
            if let Err(e) = detach(&detach_at) {
                tracing::error!(error = %e, "cannot detach the mount");
            }
        }
    });
    let mut served = tokio::task::spawn_blocking(move || session.run());
    tokio::select! {
        _ = ready_rx => {
            // The ring first: once the kernel has accepted it, every
            // request waits until each queue has an entry.
            let queues = if core.io_uring_accepted() {
                if let Err(e) = start_ring(core, &dev, args.threads, &mountpoint).await {
                    // Requests would wait for the ring for ever: leave no
                    // mount behind.
                    let _ = detach(&mountpoint);
                    return Err(e);
                }
                "io_uring"
            } else if args.fuse_io_uring == FuseIoUring::On {
                // Offered when checked above, withdrawn since: leave no
                // mount behind.
                let _ = detach(&mountpoint);
                bail!("{}", ring_refused());
            } else {
                "/dev/fuse"
            };
            let at = mountpoint.clone();
            let kib = args.kernel_read_ahead_kib;
            tokio::task::spawn_blocking(move || set_kernel_read_ahead(&at, kib)).await?;
            drop(dev);
            println!(
                "storagectl: mounted on {} (reads via {path}, requests via {queues}); ready",
                mountpoint.display()
            );
        }
        ended = &mut served => {
            ended?.with_context(|| format!("serving {}", mountpoint.display()))?;
            bail!("the mount at {} ended before it was ready", mountpoint.display());
        }
    }
    served
        .await?
        .with_context(|| format!("serving {}", mountpoint.display()))?;
    eprintln!("storagectl: unmounted {}", mountpoint.display());
    Ok(())
}

/// How long the io_uring queues may take to register once started.
const RING_READY_WAIT: Duration = Duration::from_secs(10);

/// Starts the FUSE io_uring queues and waits until the mount answers
/// through them (a `stat` of the mount point, which the kernel holds
/// until every queue has an entry).
async fn start_ring(
    core: Arc<fs::Core>,
    dev: &std::os::fd::OwnedFd,
    threads: usize,
    mountpoint: &Path,
) -> anyhow::Result<()> {
    ring::start(core, dev, threads, fs::RING_PAYLOAD_BYTES)
        .context("starting the FUSE io_uring queues")?;
    let at = mountpoint.to_path_buf();
    let answered = tokio::time::timeout(
        RING_READY_WAIT,
        tokio::task::spawn_blocking(move || std::fs::metadata(at)),
    )
    .await;
    match answered {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e).context("the mount does not answer through its io_uring queues"),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            bail!("the FUSE io_uring queues did not start within {RING_READY_WAIT:?} (see the log)")
        }
    }
}

/// Why `--fuse-io-uring on` cannot mount here.
fn ring_refused() -> String {
    format!(
        "the kernel does not offer FUSE over io_uring (needs Linux 6.14+ with \
         CONFIG_FUSE_IO_URING and `echo 1 > {}`); mount with --fuse-io-uring auto or off",
        ring::ENABLE_URING
    )
}

/// Sets the read-ahead of the mount's backing device (`/sys/class/bdi`):
/// FUSE starts at 128 KiB, so sequential readers would see only 128 KiB
/// requests; larger read-ahead sends up to 1 MiB each. After the kernel's
/// handshake (which would lower it again); a failure (not root) is logged.
fn set_kernel_read_ahead(mountpoint: &Path, kib: u64) {
    use std::os::unix::fs::MetadataExt;
    if kib == 0 {
        return;
    }
    let dev = match std::fs::metadata(mountpoint) {
        Ok(m) => m.dev(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot stat the mount to set its read-ahead");
            return;
        }
    };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&knob, kib.to_string()) {
        Ok(()) => tracing::info!(kib, "kernel read-ahead set"),
        Err(e) => {
            tracing::warn!(%knob, error = %e, "cannot set the kernel's read-ahead; sequential reads arrive in 128 KiB requests")
        }
    }
}

/// SIGINT and SIGTERM, caught from creation on.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for either and says which.
    async fn next(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// A mount point whose FUSE process died answers ENOTCONN ("transport
/// endpoint is not connected") and cannot be mounted on: detach it. Asked
/// with statfs, which the kernel never answers from its caches (a stat
/// of the mount point may still come from cached attributes).
fn detach_dead_mount(mountpoint: &Path) -> anyhow::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: a zeroed statfs is a valid out-buffer; the path is a valid
    // NUL-terminated string; statfs writes only the buffer.
    let rc = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut buf)
    };
    let status = if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    };
    match status {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            eprintln!(
                "storagectl: {} is a dead mount (its process died); detaching it",
                mountpoint.display()
            );
            detach(mountpoint).with_context(|| {
                format!(
                    "cannot detach the dead mount at {0}; run `fusermount3 -uz {0}` or `umount -l {0}`",
                    mountpoint.display()
                )
            })
        }
        _ => Ok(()),
    }
}

/// Lazy unmount: umount2(MNT_DETACH) as root, `fusermount3 -uz` otherwise.
fn detach(mountpoint: &Path) -> std::io::Result<()> {
    let c = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it only.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let status = std::process::Command::new("fusermount3")
        .arg("-uz")
        .arg(mountpoint)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "fusermount3 -uz exited with {status}"
        )))
    }
}
