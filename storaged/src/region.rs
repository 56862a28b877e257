//! Registered memory regions: client memory that device reads land in.
//!
//! A client on the same host creates a memfd, sizes it, fills its pages,
//! seals it against shrinking (`F_SEAL_SHRINK`), maps it, and registers it
//! by descriptor number over the Unix socket. storaged opens it through
//! `/proc/<peer pid>/fd/<n>` (the pid comes from `SO_PEERCRED`, so it names
//! the caller's own descriptor), checks that it is a sealed tmpfs file of
//! the stated size owned by the peer's uid, maps it shared, and hands out a
//! random 64-bit id. Nothing is left on disk, and a crashed client leaves
//! nothing behind.
//!
//! The seal is what keeps the daemon alive: a mapping of a file that its
//! owner truncates raises SIGBUS on the next access, and storaged's reads,
//! checksums and read-ahead copies touch the region. With `F_SEAL_SHRINK`
//! no process can make the file shorter than the mapping, so no access can
//! fault. Files opened by path cannot carry seals and are refused.
//!
//! Pages of a region are the client's to allocate: storaged pins (registers
//! with io_uring) only a region whose every page already exists, so a
//! client cannot make storaged fill a sparse region with its own memory.
//!
//! A region lives as long as its registration (`RegisterRegion` is a
//! streaming call kept open by the client; a disconnect ends it). Ending it
//! removes the id at once, so new reads fail with NOT_FOUND, but reads in
//! flight hold an `Arc` of the mapping and the engine keeps it until the
//! kernel completes them: only then is it unmapped. Limits: registered
//! bytes per uid and in total, and regions per uid (RESOURCE_EXHAUSTED).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::engine::{DIRECT_IO_ALIGN_BYTES, ForeignMemory};

/// tmpfs's `f_type` (linux/magic.h).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Limits on registered memory.
#[derive(Debug, Clone, Copy)]
pub struct RegionLimits {
    pub region_bytes_max: u64,
    pub bytes_per_client_max: u64,
    pub bytes_total_max: u64,
    pub regions_per_client_max: usize,
}

impl Default for RegionLimits {
    fn default() -> Self {
        Self {
            region_bytes_max: 4 << 30,
            bytes_per_client_max: 8 << 30,
            bytes_total_max: 16 << 30,
            regions_per_client_max: 64,
        }
    }
}

/// Why a region could not be registered or used.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error(
        "memory regions need a same-host client on storaged's Unix socket; this call came over TCP"
    )]
    NotLocal,
    #[error(
        "regions registered by path are refused: a file opened by path cannot be sealed, and shrinking it would fault storaged; register a memfd sealed with F_SEAL_SHRINK"
    )]
    ByPath,
    #[error(
        "region {path} is not sealed against shrinking: add F_SEAL_SHRINK (fcntl F_ADD_SEALS) before registering"
    )]
    NotSealed { path: PathBuf },
    #[error("the Unix socket peer's pid is unknown, so its memfd cannot be opened")]
    NoPeerPid,
    #[error("cannot open region file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("region file {path} is not a regular file on tmpfs (use /dev/shm or a memfd)")]
    NotTmpfs { path: PathBuf },
    #[error("region file {path} belongs to uid {owner}, but the client is uid {peer}")]
    NotOwner {
        path: PathBuf,
        owner: u32,
        peer: u32,
    },
    #[error(
        "region size {size_bytes} must be a positive multiple of {align} bytes and at most {max} bytes"
    )]
    BadSize {
        size_bytes: u64,
        align: usize,
        max: u64,
    },
    #[error("region file {path} holds {actual} bytes; the request says {stated}")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        stated: u64,
    },
    #[error("cannot map region file {path}: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Limit(String),
    #[error("region {id:#x} is not registered (it was deregistered, or its client disconnected)")]
    NotFound { id: u64 },
}

/// One mapped region.
pub struct RegionMap {
    pub id: u64,
    pub owner_uid: u32,
    /// The tenant that registered it ("" without tenants).
    pub tenant: String,
    /// Every page existed at registration, so pinning allocates nothing.
    populated: bool,
    /// Unregistered before `map` is unmapped (see `Drop`).
    fixed: std::sync::OnceLock<crate::engine::FixedForeign>,
    /// Taken only by `Drop`.
    map: std::mem::ManuallyDrop<memmap2::MmapRaw>,
}

impl Drop for RegionMap {
    /// Unpinning and unmapping a region (and freeing its pages, when the
    /// client has closed its memfd and this was the last mapping) takes
    /// milliseconds per 16 MiB; on an async worker that would stall every
    /// call it serves, so inside a runtime it runs on a blocking thread.
    fn drop(&mut self) {
        /// Fields drop in declaration order: the ring's registration
        /// before the memory it names.
        struct Teardown {
            _fixed: Option<crate::engine::FixedForeign>,
            _map: memmap2::MmapRaw,
        }
        let teardown = Teardown {
            _fixed: self.fixed.take(),
            // SAFETY: `map` is never used again: this is `drop`.
            _map: unsafe { std::mem::ManuallyDrop::take(&mut self.map) },
        };
        match tokio::runtime::Handle::try_current() {
            // A runtime shutting down drops the closure unrun, which drops
            // `teardown` all the same.
            Ok(h) => drop(h.spawn_blocking(move || drop(teardown))),
            Err(_) => drop(teardown),
        }
    }
}

impl std::fmt::Debug for RegionMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionMap")
            .field("id", &self.id)
            .field("owner_uid", &self.owner_uid)
            .field("len", &self.map.len())
            .finish()
    }
}

// SAFETY: `map` is a shared, page-aligned, writable mapping of `len()`
// bytes that lives (is not unmapped) as long as this value; storaged never
// holds Rust references into it across a read in flight (it reads it only
// to checksum completed reads).
unsafe impl ForeignMemory for RegionMap {
    fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
    fn fixed_buffer(&self) -> Option<u16> {
        self.fixed.get().map(|f| f.index)
    }
}

impl RegionMap {
    /// A region of storaged's own memory, `len` bytes (a multiple of 4
    /// KiB), for reads whose bytes storaged then sends itself: the TCP
    /// bulk channel's staging. Anonymous and private to this process, so
    /// no other process can write or shrink it; asked to be huge pages
    /// (one segment per device read) and allocated here, so that pinning
    /// it (`fix_with`) finds its pages.
    pub fn staging(len: usize) -> std::io::Result<Self> {
        let map = memmap2::MmapOptions::new().len(len).map_anon()?;
        let _ = map.advise(memmap2::Advice::HugePage);
        let _ = map.advise(memmap2::Advice::PopulateWrite);
        Ok(Self {
            id: 0,
            owner_uid: 0,
            tenant: String::new(),
            populated: true,
            fixed: std::sync::OnceLock::new(),
            map: std::mem::ManuallyDrop::new(memmap2::MmapRaw::from(map)),
        })
    }

    /// Registers the mapping with `engine` for reads (io_uring fixed
    /// buffer) where it can; returns whether it is registered. Blocking:
    /// every page is faulted in first.
    /// A region with holes is never pinned: pinning would allocate its
    /// pages in storaged's name (reads into it then go the plain way and
    /// fault in only the pages they fill).
    pub fn fix_with(&self, engine: &dyn crate::engine::IoBackend) -> bool {
        if self.fixed.get().is_none() && self.populated {
            // Pinning a fresh region allocates and zeroes its pages, and the
            // kernel does that under the ring's lock, stalling every read
            // submitted meanwhile (12 new 36 MiB regions of 4 DataLoader
            // workers held it 265 ms). Faulted in here first, outside the
            // lock (and in parallel with other regions), the pinning only
            // finds the pages. MADV_POPULATE_WRITE leaves their contents
            // alone, so reads already landing in the region are safe; on a
            // kernel without it (before 5.14) pinning faults them in as
            // before. The region has no holes (`populated`), so this maps
            // the client's pages and allocates none.
            // SAFETY: the range is exactly this live mapping.
            let _ = unsafe {
                libc::madvise(
                    self.map.as_mut_ptr().cast(),
                    self.map.len(),
                    libc::MADV_POPULATE_WRITE,
                )
            };
            // SAFETY: the mapping lives as long as `self`, and the
            // registration is stored in `self` and dropped before `map`.
            if let Some(f) = unsafe { engine.fix_foreign(self.map.as_mut_ptr(), self.map.len()) } {
                let _ = self.fixed.set(f);
            }
        }
        self.fixed.get().is_some()
    }

    /// Bytes `[offset, offset + len)` as a slice, for checksumming reads
    /// that have completed. The client may write its region at any time;
    /// that can only spoil the checksum of its own data.
    ///
    /// # Safety
    ///
    /// No read into this range may be in flight.
    pub unsafe fn completed(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset.checked_add(len).is_some_and(|e| e <= self.map.len()));
        // SAFETY: in bounds (asserted); the caller guarantees the kernel is
        // not writing it.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) }
    }

    /// Zeroes `[offset, offset + len)`: the tail of a read past an object's
    /// end, so no neighbouring bytes reach the client.
    ///
    /// # Safety
    ///
    /// No read into this range may be in flight.
    pub unsafe fn zero(&self, offset: usize, len: usize) {
        assert!(offset.checked_add(len).is_some_and(|e| e <= self.map.len()));
        // SAFETY: in bounds (asserted), writable shared mapping, and no
        // read in flight there (caller).
        unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().add(offset), 0, len) };
    }

    /// Copies `bytes` to `offset` (a degraded read, rebuilt in storaged's
    /// memory, delivered into the region).
    ///
    /// # Safety
    ///
    /// No read into this range may be in flight.
    pub unsafe fn copy_in(&self, offset: usize, bytes: &[u8]) {
        assert!(
            offset
                .checked_add(bytes.len())
                .is_some_and(|e| e <= self.map.len())
        );
        // SAFETY: in bounds (asserted), writable shared mapping, no read in
        // flight there (caller), and `bytes` is storaged memory, so the
        // ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                bytes.len(),
            )
        };
    }
}

#[derive(Default)]
struct Registry {
    by_id: HashMap<u64, Arc<RegionMap>>,
    bytes_by_uid: HashMap<u32, u64>,
    regions_by_uid: HashMap<u32, usize>,
    bytes_total: u64,
}

/// All registered regions.
pub struct Regions {
    limits: RegionLimits,
    registry: Mutex<Registry>,
}

impl std::fmt::Debug for Regions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Regions")
            .field("limits", &self.limits)
            .finish()
    }
}

/// Keeps a region registered; dropping it deregisters the region (reads in
/// flight keep their mapping until they complete).
#[derive(Debug)]
pub struct Registration {
    regions: Arc<Regions>,
    pub region: Arc<RegionMap>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.regions.remove(self.region.id);
    }
}

/// Opens memfd `fd` of process `peer_pid` through /proc and checks it is
/// a region `peer_uid` may register: a tmpfs file it owns, sealed against
/// shrinking, of exactly `size_bytes`.
fn open_client_memfd(
    peer_pid: i32,
    fd: i32,
    size_bytes: u64,
    peer_uid: u32,
) -> Result<(std::fs::File, PathBuf), RegionError> {
    if fd < 0 || peer_pid <= 0 {
        return Err(RegionError::Open {
            path: PathBuf::from(format!("/proc/{peer_pid}/fd/{fd}")),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    // /proc/PID/fd/N is a magic link: following it is the point (so no
    // O_NOFOLLOW); the checks below are on what it leads to.
    let owned = PathBuf::from(format!("/proc/{peer_pid}/fd/{fd}"));
    let path = owned.as_path();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| RegionError::Open {
            path: path.to_owned(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| RegionError::Open {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() || !on_tmpfs(&file) {
        return Err(RegionError::NotTmpfs {
            path: path.to_owned(),
        });
    }
    if meta.uid() != peer_uid && peer_uid != 0 {
        return Err(RegionError::NotOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            peer: peer_uid,
        });
    }
    if !sealed_against_shrinking(&file) {
        return Err(RegionError::NotSealed {
            path: path.to_owned(),
        });
    }
    if meta.len() != size_bytes {
        return Err(RegionError::SizeMismatch {
            path: path.to_owned(),
            actual: meta.len(),
            stated: size_bytes,
        });
    }
    Ok((file, owned))
}

/// Where the kernel lets shared memory be huge
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`).
const SHMEM_THP_SETTING: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

impl Regions {
    pub fn new(limits: RegionLimits) -> Arc<Self> {
        // Clients ask for huge pages in their regions; a kernel that never
        // grants them to shared memory makes every device read into a
        // region one segment per 4 KiB page, markedly slower on virtio
        // disks (BENCHMARKS.md, "Huge pages"). Said once, for operators.
        if let Ok(setting) = std::fs::read_to_string(SHMEM_THP_SETTING)
            && (setting.contains("[never]") || setting.contains("[deny]"))
        {
            tracing::info!(
                setting = SHMEM_THP_SETTING,
                "client regions get 4 KiB pages here; `echo advise` into the setting lets them be huge (faster device reads into regions)"
            );
        }
        Arc::new(Self {
            limits,
            registry: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().expect("region registry poisoned")
    }

    /// Opens, checks and maps the memfd `fd` of process `peer_pid` for the
    /// client `peer_uid`.
    pub fn register(
        self: &Arc<Self>,
        peer_pid: i32,
        fd: i32,
        size_bytes: u64,
        peer_uid: u32,
        tenant: &str,
    ) -> Result<Registration, RegionError> {
        let align = DIRECT_IO_ALIGN_BYTES;
        if size_bytes == 0
            || !size_bytes.is_multiple_of(align as u64)
            || size_bytes > self.limits.region_bytes_max
        {
            return Err(RegionError::BadSize {
                size_bytes,
                align,
                max: self.limits.region_bytes_max,
            });
        }
        let (file, path) = open_client_memfd(peer_pid, fd, size_bytes, peer_uid)?;
        let path = path.as_path();
        let populated = has_no_holes(&file, size_bytes);
        // Reserve before mapping, so concurrent registrations cannot both
        // pass the limit check.
        self.reserve(peer_uid, size_bytes)?;
        let unreserve = |regions: &Self| {
            let mut r = regions.lock();
            release(&mut r, peer_uid, size_bytes);
        };
        // Not MAP_POPULATE: prefaulting both mappings made steady-state
        // reads slower (12.5k -> 9k samples/s in `storagectl epoch`).
        // Pages are faulted in by the first read into them instead, and
        // clients reuse their regions, so that happens once.
        let map = match memmap2::MmapOptions::new()
            .len(size_bytes as usize)
            .map_raw(&file)
        {
            Ok(m) => m,
            Err(source) => {
                unreserve(self);
                return Err(RegionError::Map {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut id_bytes = [0u8; 8];
        if let Err(e) = getrandom::fill(&mut id_bytes) {
            unreserve(self);
            return Err(RegionError::Map {
                path: path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            });
        }
        let region = Arc::new(RegionMap {
            id: u64::from_le_bytes(id_bytes) | 1,
            owner_uid: peer_uid,
            tenant: tenant.to_owned(),
            populated,
            fixed: std::sync::OnceLock::new(),
            map: std::mem::ManuallyDrop::new(map),
        });
        self.lock().by_id.insert(region.id, Arc::clone(&region));
        tracing::info!(
            region = format_args!("{:#x}", region.id),
            uid = peer_uid,
            size_bytes,
            "region registered"
        );
        Ok(Registration {
            regions: Arc::clone(self),
            region,
        })
    }

    /// Counts `size_bytes` more for `peer_uid` against the region limits,
    /// or refuses them.
    fn reserve(&self, peer_uid: u32, size_bytes: u64) -> Result<(), RegionError> {
        let mut r = self.lock();
        let uid_bytes = r.bytes_by_uid.get(&peer_uid).copied().unwrap_or(0);
        let uid_regions = r.regions_by_uid.get(&peer_uid).copied().unwrap_or(0);
        if uid_regions + 1 > self.limits.regions_per_client_max {
            return Err(RegionError::Limit(format!(
                "uid {peer_uid} already has {uid_regions} regions; the limit is {}",
                self.limits.regions_per_client_max
            )));
        }
        if uid_bytes + size_bytes > self.limits.bytes_per_client_max {
            return Err(RegionError::Limit(format!(
                "uid {peer_uid} has {uid_bytes} bytes registered; {size_bytes} more would pass the per-client limit of {}",
                self.limits.bytes_per_client_max
            )));
        }
        if r.bytes_total + size_bytes > self.limits.bytes_total_max {
            return Err(RegionError::Limit(format!(
                "{} bytes are registered; {size_bytes} more would pass the total limit of {}",
                r.bytes_total, self.limits.bytes_total_max
            )));
        }
        *r.bytes_by_uid.entry(peer_uid).or_default() += size_bytes;
        *r.regions_by_uid.entry(peer_uid).or_default() += 1;
        r.bytes_total += size_bytes;

        Ok(())
    }

    fn remove(&self, id: u64) {
        let mut r = self.lock();
        if let Some(region) = r.by_id.remove(&id) {
            release(&mut r, region.owner_uid, region.map.len() as u64);
            tracing::info!(region = format_args!("{id:#x}"), "region deregistered");
        }
    }

    /// The region `id`, if `may_use` says the caller may use it.
    pub fn get(
        &self,
        id: u64,
        may_use: impl FnOnce(&RegionMap) -> bool,
    ) -> Result<Arc<RegionMap>, RegionError> {
        let r = self.lock();
        match r.by_id.get(&id) {
            // Another caller's region reads as absent: ids are not a way to
            // learn what other clients registered.
            Some(region) if may_use(region) => Ok(Arc::clone(region)),
            _ => Err(RegionError::NotFound { id }),
        }
    }

    /// (regions, bytes) registered now.
    pub fn usage(&self) -> (usize, u64) {
        let r = self.lock();
        (r.by_id.len(), r.bytes_total)
    }

    /// Registered regions that are also kernel-registered (fixed buffers).
    pub fn fixed_count(&self) -> usize {
        self.lock()
            .by_id
            .values()
            .filter(|m| m.fixed_buffer().is_some())
            .count()
    }
}

fn release(r: &mut Registry, uid: u32, bytes: u64) {
    r.bytes_total -= bytes;
    if let Some(b) = r.bytes_by_uid.get_mut(&uid) {
        *b -= bytes;
        if *b == 0 {
            r.bytes_by_uid.remove(&uid);
        }
    }
    if let Some(n) = r.regions_by_uid.get_mut(&uid) {
        *n -= 1;
        if *n == 0 {
            r.regions_by_uid.remove(&uid);
        }
    }
}

/// Whether `file` carries `F_SEAL_SHRINK` (only memfds can).
fn sealed_against_shrinking(file: &std::fs::File) -> bool {
    // SAFETY: F_GET_SEALS takes no argument and only reads the open fd's
    // seals; it fails (EINVAL) for files that cannot be sealed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// Whether every page of `file`'s first `len` bytes is allocated: tmpfs
/// counts allocated pages (written, faulted in or fallocated) in
/// `st_blocks`.
fn has_no_holes(file: &std::fs::File, len: u64) -> bool {
    file.metadata()
        .is_ok_and(|m| m.blocks().saturating_mul(512) >= len)
}

fn on_tmpfs(file: &std::fs::File) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs(2) writes a `statfs` into the pointer on success; the
    // fd is open for the duration of the call.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: rc == 0, so the kernel filled it in.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs by target
    let f_type = st.f_type as i64;
    f_type == TMPFS_MAGIC
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::service::GrpcCode;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// A memfd of `len` bytes, its pages filled, sealed against shrinking
    /// when `seal`.
    pub(crate) fn memfd(len: u64, seal: bool) -> OwnedFd {
        memfd_with(len, seal, true)
    }

    /// [`memfd`], its pages allocated only when `fill` (else sparse).
    fn memfd_with(len: u64, seal: bool, fill: bool) -> OwnedFd {
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe {
            libc::memfd_create(
                c"storaged-test-region".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = std::fs::File::from(fd);
        file.set_len(len).unwrap();
        if fill {
            // SAFETY: fallocate on the open memfd, within its size.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
            assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
        }
        if seal {
            // SAFETY: F_ADD_SEALS on an open memfd made with ALLOW_SEALING.
            let rc =
                unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            assert_eq!(rc, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
        }
        OwnedFd::from(file)
    }

    pub(crate) fn pid() -> i32 {
        std::process::id() as i32
    }

    fn uid() -> u32 {
        // SAFETY: getuid(2) cannot fail.
        unsafe { libc::getuid() }
    }

    #[test]
    fn registers_checks_and_deregisters() {
        let regions = Regions::new(RegionLimits {
            region_bytes_max: 1 << 20,
            bytes_per_client_max: 1 << 20,
            bytes_total_max: 1 << 20,
            regions_per_client_max: 2,
        });
        let f = memfd(256 << 10, true);
        let fd = f.as_raw_fd();
        let a = regions.register(pid(), fd, 256 << 10, uid(), "").unwrap();
        assert!(a.region.populated);
        assert_eq!(regions.usage(), (1, 256 << 10));
        assert_eq!(regions.get(a.region.id, |_| true).unwrap().id, a.region.id);
        let g = memfd(1 << 20, true);
        let err = regions
            .register(pid(), g.as_raw_fd(), 1 << 20, uid(), "")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        let err = regions.register(pid(), fd, 4096, uid(), "").unwrap_err();
        assert!(matches!(err, RegionError::SizeMismatch { .. }), "{err}");
        let err = regions.register(pid(), fd, 1000, uid(), "").unwrap_err();
        assert!(matches!(err, RegionError::BadSize { .. }), "{err}");
        let err = regions
            .register(pid(), 1 << 20, 4096, uid(), "")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        let on_disk = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        on_disk.as_file().set_len(4096).unwrap();
        let err = regions
            .register(pid(), on_disk.as_file().as_raw_fd(), 4096, uid(), "")
            .unwrap_err();
        assert!(matches!(err, RegionError::NotTmpfs { .. }), "{err}");
        if uid() != 12345 {
            let err = regions
                .register(pid(), fd, 256 << 10, 12345, "")
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        }
        let id = a.region.id;
        let held = Arc::clone(&a.region);
        drop(a);
        assert_eq!(regions.usage(), (0, 0));
        assert_eq!(
            regions.get(id, |_| true).unwrap_err().code(),
            tonic::Code::NotFound
        );
        // A read in flight would still hold the mapping.
        assert_eq!(held.len(), 256 << 10);
    }

    #[test]
    fn unsealed_and_path_regions_are_refused() {
        // Guards against a region its owner can shrink under storaged's
        // mapping (SIGBUS on the next read into it).
        let regions = Regions::new(RegionLimits::default());
        let f = memfd(64 << 10, false);
        let err = regions
            .register(pid(), f.as_raw_fd(), 64 << 10, uid(), "")
            .unwrap_err();
        assert!(matches!(err, RegionError::NotSealed { .. }), "{err}");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // A /dev/shm file cannot be sealed at all.
        let shm = tempfile::Builder::new()
            .prefix("storaged-test-region-")
            .tempfile_in("/dev/shm")
            .unwrap();
        shm.as_file().set_len(64 << 10).unwrap();
        let err = regions
            .register(pid(), shm.as_file().as_raw_fd(), 64 << 10, uid(), "")
            .unwrap_err();
        assert!(matches!(err, RegionError::NotSealed { .. }), "{err}");
    }

    #[test]
    fn a_sealed_region_cannot_shrink_and_a_sparse_one_is_not_pinned() {
        // Guards against storaged filling a client's sparse region with
        // its own memory (pinning faults in every page).
        let regions = Regions::new(RegionLimits::default());
        let f = memfd(64 << 10, true);
        let r = regions
            .register(pid(), f.as_raw_fd(), 64 << 10, uid(), "")
            .unwrap();
        // SAFETY: ftruncate on an open fd.
        let rc = unsafe { libc::ftruncate(f.as_raw_fd(), 0) };
        assert_eq!(rc, -1, "a sealed memfd must refuse to shrink");
        // SAFETY: the region is live and no read is in flight.
        unsafe { r.region.zero(0, 64 << 10) };
        // Sparse: sized but never filled.
        let sparse = std::fs::File::from(memfd_with(1 << 20, true, false));
        let s = regions
            .register(pid(), sparse.as_raw_fd(), 1 << 20, uid(), "")
            .unwrap();
        assert!(!s.region.populated);
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::engine::build(
            crate::engine::EngineKind::Auto,
            crate::engine::tests::test_files(dir.path(), 1, 1 << 20),
            crate::engine::tests::test_pool(),
            crate::engine::EngineLimits {
                queue_depth_per_device_max: 4,
                psync_threads: 1,
            },
        )
        .unwrap();
        assert!(
            !s.region.fix_with(&*engine),
            "a sparse region is never pinned"
        );
        assert!(
            !has_no_holes(&sparse, 1 << 20),
            "storaged allocated the pages of a sparse region"
        );
    }
}
