//! storaged through `storagectl mount`: the same files the local peers
//! read, read with the same pread loop (`local::read_items`) from the FUSE
//! mount, and the mount's listings timed with `ls -f` and `find`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Item;
use super::storaged::Daemon;
use crate::results::Measurement;
use crate::stats::cpu_seconds;

/// Kernel request threads of the harness's mount.
const MOUNT_THREADS: &str = "8";

/// A running `storagectl mount`, unmounted when dropped.
pub struct Mount {
    child: Option<Child>,
    pub path: PathBuf,
}

/// Whether this process can mount: root and /dev/fuse.
pub fn available() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/fuse").exists()
}

impl Mount {
    /// Mounts every dataset of the storaged at `url` on `path` (the
    /// same-host path: `--transport auto` switches a loopback URL to the
    /// Unix socket) with `extra` options, and waits until it is ready.
    pub fn start(
        storagectl: &Path,
        url: &str,
        path: &Path,
        extra: &[String],
    ) -> anyhow::Result<Mount> {
        std::fs::create_dir_all(path)?;
        let log = path.with_extension("stderr.log");
        let mut command = Command::new(storagectl);
        command
            .args(["--server", url, "mount", "--threads", MOUNT_THREADS])
            .args(extra)
            .arg(path)
            .stderr(std::fs::File::create(&log)?);
        let ready = |line: &str| Ok(line.ends_with("ready").then_some(()));
        let (child, ()) =
            storaged::testkit::spawn_until_ready(command, Duration::from_secs(120), ready)
                .with_context(|| {
                    format!(
                        "storagectl mount: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                })?;
        Ok(Mount {
            child: Some(child),
            path: path.to_path_buf(),
        })
    }

    /// The process serving the mount (its CPU is the client side's).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU seconds of the mount process so far.
fn mount_cpu(pid: u32) -> f64 {
    cpu_seconds(pid).unwrap_or(0.0)
}

/// Every item of dataset `dataset` read whole through the mount with the
/// local peers' pread loop, `concurrency` threads. Client CPU: the readers
/// and the mount process; server CPU: storaged's.
pub fn read_items(
    mount: &Mount,
    daemon: &Daemon,
    dataset: &str,
    items: &[Item],
    concurrency: u32,
) -> anyhow::Result<Measurement> {
    let (srv0, mnt0) = (daemon.cpu_seconds(), mount_cpu(mount.pid()));
    let mut m = super::local::read_items(&mount.path.join(dataset), items, concurrency, false)?;
    m.cpu_s_server = Some(daemon.cpu_seconds() - srv0);
    m.cpu_s_client = Some(m.cpu_s_client.unwrap_or(0.0) + mount_cpu(mount.pid()) - mnt0);
    Ok(m)
}

/// Times `sh -c COMMAND` printing a count (`... | wc -l`), the way a user
/// lists a dataset; the count is the measurement's samples. Client CPU:
/// the mount process's.
pub fn time_listing(command: &str, mount_pid: u32) -> anyhow::Result<Measurement> {
    let (mnt0, t0) = (mount_cpu(mount_pid), Instant::now());
    let out = Command::new("sh").arg("-c").arg(command).output()?;
    let seconds = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{command}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let count: u64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(Measurement {
        bytes: 0,
        samples: count,
        seconds,
        latencies_us: vec![seconds * 1e6],
        cpu_s_server: None,
        cpu_s_client: Some(mount_cpu(mount_pid) - mnt0),
        ..Default::default()
    })
}
