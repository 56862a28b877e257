//! The machine description written into results.json, in the spirit of
//! MLPerf Storage's system descriptions.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct DeviceInfo {
    pub path: String,
    pub size_bytes: u64,
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub ram_bytes: u64,
    pub kernel: String,
    /// Transparent huge pages for anonymous memory (storaged's buffer
    /// pool) and for shared memory (client regions), as the kernel's
    /// bracketed choice: device reads into huge pages are markedly faster
    /// on virtio disks (BENCHMARKS.md, "Huge pages").
    pub thp_anon: String,
    pub thp_shmem: String,
    /// `thp_shmem` before this run set it (`--shmem-thp`).
    pub thp_shmem_before_run: String,
    pub filesystem_of_devices: String,
    pub devices: Vec<DeviceInfo>,
    pub storaged_version: String,
    pub started_unix_s: u64,
}

/// The bracketed (current) choice of a kernel setting such as
/// `always [madvise] never`.
pub fn kernel_choice(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or("unknown")
        .to_owned()
}

fn first_line_with(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().to_owned())
}

/// File system type of the mount holding `path`, from /proc/self/mounts.
fn fs_type(path: &std::path::Path) -> String {
    let Ok(canon) = path.canonicalize() else {
        return "unknown".into();
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best = ("unknown".to_owned(), 0usize);
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 2 && canon.starts_with(f[1]) && f[1].len() >= best.1 {
            best = (format!("{} on {} ({})", f[2], f[1], f[0]), f[1].len());
        }
    }
    best.0
}

/// Where the kernel lets shared memory (client regions) be huge.
pub const SHMEM_THP_PATH: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// A kernel setting changed for the run and put back when dropped.
pub struct KernelSetting {
    path: &'static str,
    before: String,
}

impl KernelSetting {
    /// Writes `value` into `path` (needs root) unless it is the current
    /// choice already; `before` is what it was.
    pub fn apply(path: &'static str, value: &str) -> std::io::Result<Self> {
        let before = kernel_choice(path);
        if before != value {
            std::fs::write(path, value)?;
        }
        Ok(Self { path, before })
    }

    pub fn before(&self) -> &str {
        &self.before
    }
}

impl Drop for KernelSetting {
    fn drop(&mut self) {
        if kernel_choice(self.path) != self.before {
            let _ = std::fs::write(self.path, &self.before);
        }
    }
}

pub fn describe(devices: &[std::path::PathBuf], thp_shmem_before_run: &str) -> Machine {
    use std::os::unix::fs::FileTypeExt;
    let ram_kib: u64 = first_line_with("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    Machine {
        cpu_model: first_line_with("/proc/cpuinfo", "model name")
            .unwrap_or_else(|| "unknown".into()),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        ram_bytes: ram_kib * 1024,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        thp_anon: kernel_choice("/sys/kernel/mm/transparent_hugepage/enabled"),
        thp_shmem: kernel_choice(SHMEM_THP_PATH),
        thp_shmem_before_run: thp_shmem_before_run.to_owned(),
        filesystem_of_devices: devices
            .first()
            .and_then(|d| d.parent())
            .map(fs_type)
            .unwrap_or_default(),
        devices: devices
            .iter()
            .map(|p| {
                let meta = std::fs::metadata(p);
                let block = meta
                    .as_ref()
                    .map(|m| m.file_type().is_block_device())
                    .unwrap_or(false);
                let size = std::fs::File::open(p)
                    .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                    .unwrap_or(0);
                DeviceInfo {
                    path: p.display().to_string(),
                    size_bytes: size,
                    kind: if block {
                        "block device"
                    } else {
                        "regular file"
                    },
                }
            })
            .collect(),
        storaged_version: env!("CARGO_PKG_VERSION").into(),
        started_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

/// Counters of the block device holding a path, from /proc/diskstats.
#[derive(Debug, Clone, Copy)]
pub struct DiskCounters {
    pub reads: u64,
    pub sectors_read: u64,
    pub busy_ms: u64,
}

/// The counters of the block device under `path` (the device itself when
/// `path` is one): what the devices really did during a run, merged
/// requests and utilisation included.
pub fn disk_counters(path: &std::path::Path) -> Option<DiskCounters> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).ok()?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    // The kernel's encoding of dev_t (linux/kdev_t.h, new_decode_dev).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    stats.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        (n(0)? == major && n(1)? == minor).then_some(DiskCounters {
            reads: n(3)?,
            sectors_read: n(5)?,
            busy_ms: n(12)?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_under_a_file_is_found_and_counts() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, b"x").unwrap();
        // Every file lives on some device, but not every device (tmpfs,
        // overlay) has diskstats; where it has, the counters read.
        if let Some(c) = disk_counters(&f) {
            assert!(c.sectors_read >= c.reads || c.reads == 0);
        }
        assert!(disk_counters(std::path::Path::new("/nonexistent/x")).is_none());
    }
}
