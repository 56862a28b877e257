//! The I/O engine: every data read and write of the pool's devices.
//!
//! Tonic handlers run on the multi-threaded tokio runtime and need `Send`
//! futures, while io_uring submission is naturally single-threaded. So each
//! engine owns dedicated threads: the io_uring engine one thread that owns the
//! ring (through the `io-uring` crate), the pread engine a few blocking
//! workers. Requests reach them over a bounded channel whose capacity is the
//! number of pool buffers: every operation holds a buffer, so the channel can
//! never be full and submission never blocks the async runtime. Results come
//! back through the buffer's completion slot (see `buf`), so the hot path
//! allocates nothing.
//!
//! Reads can also land outside the pool, in memory a same-host client
//! registered ([`ForeignMemory`], see `region`): the device DMA writes
//! straight into the client's pages. Such a read keeps an `Arc` to its
//! target until the kernel has completed it, even when the waiting future is
//! dropped, so a client that disconnects mid-read never has its mapping
//! unmapped under a read in flight. They complete through a oneshot channel
//! (one small allocation per read) and are bounded separately,
//! [`FOREIGN_READS_IN_FLIGHT_MAX`] at a time, by the caller.
//!
//! `IoBackend` is the seam for tests: [`fault::FaultyBackend`] wraps any
//! engine and injects errors and bit flips.

mod elevator;
pub mod fault;
pub mod memory;
pub mod metered;
pub mod psync;
pub mod route;
pub mod uring;

use std::fs::File;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::buf::{BufLease, BufferPool, IoFuture};

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
}

/// One device operation. `offset` and the buffer's length are multiples of
/// 4 KiB; reads fill `len` bytes of the buffer, writes send its `len()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoOp {
    pub kind: OpKind,
    pub device: u32,
    pub offset: u64,
    pub len: u32,
}

/// Reads of foreign memory that one engine accepts at a time; callers bound
/// themselves to this (the store holds a semaphore of this size).
pub const FOREIGN_READS_IN_FLIGHT_MAX: usize = 1024;

/// Alignment of device offsets, lengths and target addresses (O_DIRECT).
pub const DIRECT_IO_ALIGN_BYTES: usize = crate::buf::ALIGN_BYTES;

/// Memory outside the buffer pool that reads may target.
///
/// # Safety
///
/// Implementors guarantee that `base()..base() + len()` is mapped, writable
/// and 4 KiB aligned for as long as the value lives, and that nothing in
/// this process reads it as Rust-owned data while reads may be landing.
pub unsafe trait ForeignMemory: Send + Sync + 'static {
    fn base(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The io_uring fixed-buffer index this memory is registered as (see
    /// [`IoBackend::fix_foreign`]), covering exactly `base()..base() +
    /// len()` in the engine that reads into it; `None` if not registered.
    fn fixed_buffer(&self) -> Option<u16> {
        None
    }
}

/// Foreign memory registered with the kernel for the life of this value
/// (an io_uring fixed buffer): reads into it skip pinning its pages for
/// every I/O. Dropping it unregisters the memory; it must outlive every
/// read that uses `index`, which holding it inside the memory's owner (as
/// `RegionMap` does) guarantees, since reads hold the owner.
pub struct FixedForeign {
    pub index: u16,
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl FixedForeign {
    pub fn new(index: u16, release: Box<dyn FnOnce() + Send + Sync>) -> Self {
        Self {
            index,
            release: Some(release),
        }
    }
}

impl std::fmt::Debug for FixedForeign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedForeign")
            .field("index", &self.index)
            .finish()
    }
}

impl Drop for FixedForeign {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

/// A device read into foreign memory.
#[derive(Clone)]
pub struct ForeignRead {
    pub device: u32,
    pub device_offset: u64,
    pub len: u32,
    pub memory: Arc<dyn ForeignMemory>,
    pub memory_offset: usize,
}

impl std::fmt::Debug for ForeignRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignRead")
            .field("device", &self.device)
            .field("device_offset", &self.device_offset)
            .field("len", &self.len)
            .field("memory_offset", &self.memory_offset)
            .finish()
    }
}

impl ForeignRead {
    /// Rejects reads outside the memory, on a missing device, or not
    /// aligned for O_DIRECT.
    pub fn check(&self, device_count: u32) -> io::Result<()> {
        let align = DIRECT_IO_ALIGN_BYTES;
        let end = self.memory_offset.checked_add(self.len as usize);
        let ok = self.device < device_count
            && self.len > 0
            && end.is_some_and(|e| e <= self.memory.len())
            && self.device_offset.is_multiple_of(align as u64)
            && (self.len as usize).is_multiple_of(align)
            && (self.memory.base() as usize + self.memory_offset).is_multiple_of(align);
        if ok {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bad foreign read {self:?} (memory of {} bytes, {device_count} devices)",
                    self.memory.len()
                ),
            ))
        }
    }

    /// Does the read at once, in the calling thread: checks it, then lets
    /// `read` fill the whole target (engines that simulate devices).
    pub fn complete_in_place(
        &self,
        device_count: u32,
        read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> ForeignReadFuture {
        if let Err(e) = self.check(device_count) {
            return ForeignReadFuture::ready(Err(e));
        }
        // SAFETY: `check` established that the `len` bytes at the target
        // are inside the memory, which its `ForeignMemory` contract keeps
        // mapped and writable while `self` (holding it) lives, and which
        // nothing reads as Rust data while reads may land; the slice does
        // not outlive this call.
        let target = unsafe { std::slice::from_raw_parts_mut(self.target(0), self.len as usize) };
        ForeignReadFuture::ready(read(target))
    }

    /// The target address of byte `done` of this read.
    pub fn target(&self, done: u32) -> *mut u8 {
        debug_assert!(done < self.len);
        // SAFETY: `check` established memory_offset + len <= memory.len(),
        // and done < len, so the address is inside the mapping.
        unsafe { self.memory.base().add(self.memory_offset + done as usize) }
    }
}

/// Resolves with the bytes read once the kernel is done with the target.
pub struct ForeignReadFuture(ForeignReadInner);

enum ForeignReadInner {
    Ready(Option<io::Result<usize>>),
    Waiting(futures::channel::oneshot::Receiver<io::Result<usize>>),
    /// Post-processed by a wrapper (fault injection).
    Boxed(Pin<Box<dyn Future<Output = io::Result<usize>> + Send>>),
}

impl ForeignReadFuture {
    pub fn ready(result: io::Result<usize>) -> Self {
        Self(ForeignReadInner::Ready(Some(result)))
    }

    pub fn boxed(f: impl Future<Output = io::Result<usize>> + Send + 'static) -> Self {
        Self(ForeignReadInner::Boxed(Box::pin(f)))
    }

    /// A future and the sender its engine completes it with.
    pub fn channel() -> (futures::channel::oneshot::Sender<io::Result<usize>>, Self) {
        let (tx, rx) = futures::channel::oneshot::channel();
        (tx, Self(ForeignReadInner::Waiting(rx)))
    }
}

impl Future for ForeignReadFuture {
    type Output = io::Result<usize>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        match &mut self.0 {
            ForeignReadInner::Ready(r) => {
                Poll::Ready(r.take().expect("ForeignReadFuture polled after completion"))
            }
            ForeignReadInner::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Err(io::Error::other("the I/O engine stopped")))),
            ForeignReadInner::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}

/// A device I/O engine. Implementations must complete every submitted
/// operation exactly once, through [`BufferPool::complete`], and keep the
/// buffer untouched after that.
pub trait IoBackend: Send + Sync + 'static {
    /// Short name for logs and `status`: "io_uring", "psync", ...
    fn kind(&self) -> &'static str;
    /// Queues `op` on `buf`. Never blocks.
    fn submit(&self, op: IoOp, buf: BufLease) -> IoFuture;
    /// Queues a read into foreign memory. Never blocks; the engine holds
    /// `read.memory` until the read is complete.
    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture;
    /// Makes completed writes of `device` durable (fdatasync). Blocking.
    fn sync(&self, device: u32) -> io::Result<()>;
    /// Gives `[offset, offset + len)` of `device` back to the device: a
    /// punched hole in a regular file, a discard (TRIM) on a block device.
    /// The range then reads as zeros or as whatever the device keeps; the
    /// caller must own it (no data, no I/O in flight). Blocking.
    /// `ErrorKind::Unsupported` where the device cannot do it.
    fn discard(&self, device: u32, offset: u64, len: u64) -> io::Result<()>;
    fn device_count(&self) -> u32;
    /// Registers `[base, base + len)` with the kernel for reads, where the
    /// engine and the kernel allow it (io_uring fixed buffers; the pages
    /// are pinned once, here, instead of per I/O). `None` otherwise; reads
    /// then work as before. Blocking (pinning faults the pages in).
    ///
    /// # Safety
    ///
    /// The range must stay mapped until the returned value is dropped.
    unsafe fn fix_foreign(&self, base: *mut u8, len: usize) -> Option<FixedForeign> {
        let _ = (base, len);
        None
    }
}

/// Synchronous I/O on one device outside the engine: the pool's metadata
/// (roots and manifests), which is small, written rarely and must be
/// durable when the call returns. The seam where tests simulate power loss
/// (see `crash`); a plain [`File`] is the real thing.
pub trait DeviceFile: Send + Sync + std::fmt::Debug {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the writes so far durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
}

impl DeviceFile for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// [`IoBackend::discard`] for one opened device: `fallocate(PUNCH_HOLE)`
/// on a regular file (its blocks go back to the file system), `BLKDISCARD`
/// on a block device.
pub fn discard_file(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    if len == 0 {
        return Ok(());
    }
    let kind = file.metadata()?.file_type();
    let fd = file.as_raw_fd();
    let rc = if kind.is_file() {
        // SAFETY: fallocate on an fd this engine owns; no memory is passed.
        unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        }
    } else if kind.is_block_device() {
        /// `_IO(0x12, 119)` from <linux/fs.h>.
        const BLKDISCARD: libc::c_ulong = 0x1277;
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD reads two u64 (start, length) from the
        // pointer, which points at `range` for the whole call.
        unsafe { libc::ioctl(fd, BLKDISCARD as _, range.as_ptr()) }
    } else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "neither a regular file nor a block device",
        ));
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL) => {
            io::Error::new(io::ErrorKind::Unsupported, e)
        }
        _ => e,
    })
}

/// Which engine to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring if the kernel allows it, else psync with a warning.
    Auto,
    Uring,
    Psync,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" | "io_uring" => Ok(Self::Uring),
            "psync" => Ok(Self::Psync),
            other => Err(format!(
                "unknown engine {other:?}; expected auto, uring or psync"
            )),
        }
    }
}

/// Limits shared by the engines.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Operations in flight per device.
    pub queue_depth_per_device_max: u32,
    /// Worker threads of the psync engine.
    pub psync_threads: u32,
}

/// Builds the engine for `files` (opened O_DIRECT, indexed by device).
pub fn build(
    kind: EngineKind,
    files: Vec<File>,
    pool: Arc<BufferPool>,
    limits: EngineLimits,
) -> io::Result<Arc<dyn IoBackend>> {
    match kind {
        EngineKind::Psync => Ok(Arc::new(psync::PsyncEngine::new(files, pool, limits)?)),
        EngineKind::Uring => Ok(Arc::new(uring::UringEngine::new(files, pool, limits)?)),
        EngineKind::Auto => {
            let dup: io::Result<Vec<File>> = files.iter().map(File::try_clone).collect();
            match uring::UringEngine::new(dup?, Arc::clone(&pool), limits) {
                Ok(e) => Ok(Arc::new(e)),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "io_uring is unavailable; falling back to the psync (pread/pwrite) engine"
                    );
                    Ok(Arc::new(psync::PsyncEngine::new(files, pool, limits)?))
                }
            }
        }
    }
}

/// Reads `len` bytes at `offset` of `device` into `buf`, failing on a short
/// read.
pub async fn read_exact(
    engine: &dyn IoBackend,
    device: u32,
    offset: u64,
    len: usize,
    buf: BufLease,
) -> io::Result<BufLease> {
    let (r, buf) = read_exact_keep(engine, device, offset, len, buf).await;
    r.map(|()| buf)
}

/// [`read_exact`] that hands the buffer back whatever happened (callers
/// that rebuild a failed read in place need it).
pub async fn read_exact_keep(
    engine: &dyn IoBackend,
    device: u32,
    offset: u64,
    len: usize,
    mut buf: BufLease,
) -> (io::Result<()>, BufLease) {
    buf.set_len(len);
    let op = IoOp {
        kind: OpKind::Read,
        device,
        offset,
        len: len as u32,
    };
    let (res, buf) = engine.submit(op, buf).await;
    let r = match res {
        Ok(n) if n == len => Ok(()),
        Ok(n) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short read on device {device} at {offset}: {n} of {len} bytes"),
        )),
        Err(e) => Err(e),
    };
    (r, buf)
}

/// Writes all of `buf` at `offset` of `device`.
pub async fn write_all(
    engine: &dyn IoBackend,
    device: u32,
    offset: u64,
    buf: BufLease,
) -> io::Result<BufLease> {
    let len = buf.len();
    let op = IoOp {
        kind: OpKind::Write,
        device,
        offset,
        len: len as u32,
    };
    let (res, buf) = engine.submit(op, buf).await;
    let n = res?;
    if n != len {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write on device {device} at {offset}: {n} of {len} bytes"),
        ));
    }
    Ok(buf)
}

#[cfg(test)]
pub(crate) mod tests {
    //! Conformance tests every engine must pass.
    use super::*;
    use crate::buf::ClassSpec;
    use std::os::unix::fs::OpenOptionsExt;

    pub(crate) fn test_files(dir: &std::path::Path, n: u32, size: u64) -> Vec<File> {
        (0..n)
            .map(|i| {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .custom_flags(libc::O_DIRECT)
                    .open(dir.join(format!("dev{i}")))
                    .unwrap();
                f.set_len(size).unwrap();
                f
            })
            .collect()
    }

    pub(crate) fn test_pool() -> Arc<BufferPool> {
        BufferPool::new(vec![
            ClassSpec {
                buf_bytes: 4096,
                count: 16,
            },
            ClassSpec {
                buf_bytes: 65536,
                count: 8,
            },
        ])
        .unwrap()
    }

    pub(crate) async fn conformance(engine: Arc<dyn IoBackend>, pool: Arc<BufferPool>) {
        // Write a distinct pattern to each device, read it back.
        for dev in 0..engine.device_count() {
            let mut buf = pool.acquire(65536).await.unwrap();
            for (i, b) in buf.as_mut_full()[..65536].iter_mut().enumerate() {
                *b = (i as u32 * 7 + dev) as u8;
            }
            buf.set_len(65536);
            write_all(&*engine, dev, 8192, buf).await.unwrap();
            engine.sync(dev).unwrap();
        }
        for dev in 0..engine.device_count() {
            let buf = pool.acquire(65536).await.unwrap();
            let buf = read_exact(&*engine, dev, 8192, 65536, buf).await.unwrap();
            for (i, b) in buf.as_slice().iter().enumerate() {
                assert_eq!(*b, (i as u32 * 7 + dev) as u8, "dev {dev} byte {i}");
            }
        }
        // Many concurrent small reads, more than the queue depth.
        let mut futs = Vec::new();
        for k in 0..16u64 {
            let buf = pool.acquire(4096).await.unwrap();
            let e = Arc::clone(&engine);
            futs.push(async move {
                let buf = read_exact(&*e, (k % 2) as u32, 8192 + (k % 16) * 4096, 4096, buf)
                    .await
                    .unwrap();
                (k, buf.as_slice()[0])
            });
        }
        for (k, first) in futures::future::join_all(futs).await {
            let i = (k % 16) * 4096;
            assert_eq!(first, (i as u32 * 7 + (k % 2) as u32) as u8);
        }
        // Reading past the end is a short read, reported as an error.
        let buf = pool.acquire(4096).await.unwrap();
        let err = read_exact(&*engine, 0, 1 << 20, 4096, buf)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // Cancelled reads: drop the futures at once, then make sure every
        // buffer comes back.
        for _ in 0..4 {
            let leases = pool.acquire_many(4096, 16).await.unwrap();
            for (k, mut l) in leases.into_iter().enumerate() {
                l.set_len(4096);
                let op = IoOp {
                    kind: OpKind::Read,
                    device: 0,
                    offset: k as u64 * 4096,
                    len: 4096,
                };
                drop(engine.submit(op, l));
            }
        }
        let all = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            pool.acquire_many(4096, 16),
        )
        .await
        .expect("cancelled buffers came back")
        .unwrap();
        drop(all);
        foreign_conformance(&*engine).await;
    }

    /// Anonymous memory for foreign reads; counts its drops.
    pub(crate) struct TestMemory {
        map: memmap2::MmapRaw,
        dropped: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl TestMemory {
        pub(crate) fn new(len: usize, dropped: Arc<std::sync::atomic::AtomicUsize>) -> Arc<Self> {
            let map = memmap2::MmapOptions::new().len(len).map_anon().unwrap();
            Arc::new(Self {
                map: map.into(),
                dropped,
            })
        }

        pub(crate) fn bytes(&self) -> &[u8] {
            // SAFETY: tests read only after their reads completed.
            unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
        }
    }

    impl Drop for TestMemory {
        fn drop(&mut self) {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    // SAFETY: an anonymous mapping, page-aligned, alive as long as `self`.
    unsafe impl ForeignMemory for TestMemory {
        fn base(&self) -> *mut u8 {
            self.map.as_mut_ptr()
        }
        fn len(&self) -> usize {
            self.map.len()
        }
    }

    /// Foreign reads: land in place, are checked, and keep their memory
    /// alive until completion even when the future is dropped. Expects the
    /// pattern `conformance` wrote.
    async fn foreign_conformance(engine: &dyn IoBackend) {
        let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let memory = TestMemory::new(1 << 20, Arc::clone(&dropped));
        let read = |device, memory_offset, len| ForeignRead {
            device,
            device_offset: 8192,
            len,
            memory: memory.clone(),
            memory_offset,
        };
        assert_eq!(
            engine.read_foreign(read(1, 4096, 65536)).await.unwrap(),
            65536
        );
        for (i, b) in memory.bytes()[4096..4096 + 65536].iter().enumerate() {
            assert_eq!(*b, (i as u32 * 7 + 1) as u8, "foreign byte {i}");
        }
        for bad in [
            read(1, 100, 4096),
            read(1, 0, 100),
            read(9, 0, 4096),
            read(1, 1 << 20, 4096),
        ] {
            let err = engine.read_foreign(bad).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        // Dropped at once: the engine still owns the target until the
        // kernel is done, then lets it go.
        for k in 0..64 {
            drop(engine.read_foreign(read(k % 2, (k as usize % 16) * 65536, 65536)));
        }
        drop(memory);
        let released = async {
            while dropped.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), released)
            .await
            .expect("the memory of cancelled foreign reads is released after completion");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_engine_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let pool = test_pool();
        let limits = EngineLimits {
            queue_depth_per_device_max: 4,
            psync_threads: 2,
        };
        let engine = build(
            EngineKind::Auto,
            test_files(dir.path(), 2, 1 << 20),
            Arc::clone(&pool),
            limits,
        )
        .unwrap();
        conformance(engine, pool).await;
    }
}
