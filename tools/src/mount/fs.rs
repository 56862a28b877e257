//! The FUSE file system: the kernel's requests answered from the
//! namespace (metadata, no round trip) and the reader (data).
//!
//! [`Core`] holds the answers; fuser's threads reach it through
//! [`MountFs`] (the `fuser::Filesystem`), the io_uring queues through
//! `ring.rs` and `ops.rs`, so both ways answer alike.
//!
//! Read-only by construction: every request that would change anything is
//! answered EROFS, whatever the mount options. Entries and attributes
//! inside a dataset are cached by the kernel for `attr_ttl` (datasets are
//! immutable), negative entries too; the top level for the refresh
//! interval, so datasets come and go within it. Files up to
//! `cached_file_bytes_max` open with `FOPEN_KEEP_CACHE`: the page cache
//! survives a reopen. Larger files open with `FOPEN_DIRECT_IO`: a read goes
//! to this process at the reader's size and the reply lands in the
//! reader's buffer, where the page cache would add a copy, a page
//! allocation per 4 KiB and its own read-ahead on top of the mount's
//! windows (streaming 4 shards at once measured 0.7 GiB/s through the page
//! cache, 1.3-1.7 direct). Such files still mmap (through the page cache)
//! where the kernel offers `FUSE_DIRECT_IO_ALLOW_MMAP`; where it does not,
//! every file uses the page cache.
//!
//! A small file's open starts fetching it whole right after the answer
//! (`Reader::fetch_whole_at_open`), unless its last such fetch went
//! unused: the open, its reads and its release each note what they saw
//! (`Opened::note`), and a release with no read after a fetch at open
//! tells the index the page cache holds the file.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use storaged_client::Client;

use super::index::{NodeId, NodeKind, TREE_ROOT, Tree};
use super::namespace::{DatasetEntry, Inode, Namespace, within};
use super::reader::{Answer, OpenFile, Pending, ReadFailure, Reader};

/// `st_blksize` of every file: tools size their reads by it.
const BLOCK_SIZE_BYTES: u32 = 1 << 20;
/// The largest read-ahead the kernel is asked for (its own limit is
/// lower on some kernels).
const KERNEL_READAHEAD_BYTES_MAX: u32 = 1 << 20;
/// The payload buffer of one FUSE io_uring entry: the largest request
/// or answer (reads and read-ahead up to 1 MiB; `max_write` is lowered to
/// it when the ring is accepted).
pub const RING_PAYLOAD_BYTES: usize = KERNEL_READAHEAD_BYTES_MAX as usize;
/// `statfs` answers are reused this long.
const STATFS_TTL: Duration = Duration::from_secs(5);
/// How long `statfs` waits for storaged (`df` must not hang on it).
const STATFS_WAIT_MAX: Duration = Duration::from_secs(2);
const XATTR_CRC32: &str = "user.storaged.crc32";
const XATTR_CLASS: &str = "user.storaged.class";

/// The FUSE file system as fuser serves it: the shared [`Core`] and the
/// handshake's one-time callback.
pub struct MountFs {
    core: Arc<Core>,
    /// Called once the kernel has finished the handshake.
    on_ready: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Offer the kernel FUSE over io_uring (`ring.rs` serves it).
    offer_io_uring: bool,
}

impl std::ops::Deref for MountFs {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

/// What every request is answered from, whichever way it came (fuser's
/// threads reading `/dev/fuse`, or the io_uring queues of `ring.rs`).
pub struct Core {
    ns: Namespace,
    reader: Arc<Reader>,
    client: Client,
    runtime: tokio::runtime::Handle,
    files: Mutex<HashMap<u64, Arc<Opened>>>,
    next_fh: AtomicU64,
    attr_ttl: Duration,
    refresh: Duration,
    /// Larger files bypass the page cache (`u64::MAX` after `init` on a
    /// kernel that could not mmap them then).
    cached_file_bytes_max: AtomicU64,
    kernel_background_max: u16,
    uid: u32,
    gid: u32,
    /// When the mount began: the top level's times.
    started: SystemTime,
    statfs: Mutex<Option<(Instant, [u64; 3])>>,
    /// The kernel accepted FUSE over io_uring in the handshake.
    io_uring: AtomicBool,
}

/// An open file, and what its open and reads tell about the page cache.
pub struct Opened {
    file: OpenFile,
    tree: Arc<Tree>,
    node: NodeId,
    /// `FETCHED_AT_OPEN`, `READ`, `RELEASED`: set by the open's answer,
    /// its reads and its release, which may run in any order on the
    /// kernel's threads.
    state: AtomicU8,
}

/// Answers the kernel's read of `[offset, offset + size)` of `path`.
fn answer_read(
    reply: ReplyData,
    path: &str,
    offset: u64,
    size: u32,
    result: Result<&[u8], ReadFailure>,
) {
    match result {
        Ok(bytes) => reply.data(bytes),
        Err(e) => {
            log_read_failure(path, offset, size, &e);
            reply.error(e.errno());
        }
    }
}

/// Logs a read that is answered with an error.
pub fn log_read_failure(path: &str, offset: u64, size: u32, e: &ReadFailure) {
    tracing::error!(path, offset, size, error = e.message(), "read failed");
}

/// The open started fetching the file whole (`Tree::fetch_at_open`).
const FETCHED_AT_OPEN: u8 = 1;
/// A read of it reached the mount.
const READ: u8 = 2;
/// The kernel released it.
const RELEASED: u8 = 4;

impl Opened {
    /// Records `event`; the last of a fetch at open and the release, with
    /// no read between, tells the tree the page cache held the file.
    fn note(&self, event: u8) {
        let before = self.state.fetch_or(event, Ordering::AcqRel);
        let after = before | event;
        if event == READ && before & READ == 0 {
            // The page cache does not hold all of it (now).
            self.tree.note_fetch_at_open(self.node, true);
        } else if event != READ
            && before & event == 0
            && after & (FETCHED_AT_OPEN | RELEASED) == FETCHED_AT_OPEN | RELEASED
            && after & READ == 0
        {
            self.tree.note_fetch_at_open(self.node, false);
        }
    }

    /// The object's path in its dataset.
    pub fn path(&self) -> &str {
        self.file.path()
    }

    fn released(&self) -> bool {
        self.state.load(Ordering::Acquire) & RELEASED != 0
    }
}

pub struct MountFsOptions {
    pub attr_ttl: Duration,
    pub refresh: Duration,
    pub cached_file_bytes_max: u64,
    /// Read-ahead requests the kernel keeps outstanding to the mount (its
    /// `max_background`; fuser asks for 16, and the kernel skips
    /// read-ahead past three quarters of it). Each cold small file is one
    /// such request, so this bounds how many files many readers fetch at
    /// once: 64 measured +8 % files/s at 16 readers over 16 (BENCHMARKS.md,
    /// "The mount, third pass"), 256 +70 % at 256 readers over 64 with
    /// 4-64 readers unchanged ("fifth pass").
    pub kernel_background_max: u16,
    /// Offer the kernel FUSE over io_uring in the handshake.
    pub offer_io_uring: bool,
}

impl MountFs {
    pub fn new(
        ns: Namespace,
        reader: Arc<Reader>,
        client: Client,
        runtime: tokio::runtime::Handle,
        options: MountFsOptions,
        on_ready: Box<dyn FnOnce() + Send>,
    ) -> Self {
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let core = Core {
            ns,
            reader,
            client,
            runtime,
            files: Mutex::default(),
            next_fh: AtomicU64::new(1),
            attr_ttl: options.attr_ttl,
            refresh: options.refresh,
            cached_file_bytes_max: AtomicU64::new(options.cached_file_bytes_max),
            kernel_background_max: options.kernel_background_max,
            uid,
            gid,
            started: SystemTime::now(),
            statfs: Mutex::default(),
            io_uring: AtomicBool::new(false),
        };
        Self {
            core: Arc::new(core),
            on_ready: Mutex::new(Some(on_ready)),
            offer_io_uring: options.offer_io_uring,
        }
    }

    /// The core, for the io_uring queues.
    pub fn core(&self) -> Arc<Core> {
        Arc::clone(&self.core)
    }
}

impl Core {
    fn dir_attr(&self, ino: u64, time: SystemTime) -> FileAttr {
        self.attr(ino, FileType::Directory, 0, time)
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, time: SystemTime) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm: if kind == FileType::Directory {
                0o555
            } else {
                0o444
            },
            // Directories: "unknown" (find then never guesses subdirectory
            // counts from it).
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE_BYTES,
            flags: 0,
        }
    }

    /// Attributes of `node` of `dataset`, whose tree is `tree`.
    fn node_attr(&self, dataset: &DatasetEntry, tree: &Tree, node: u32) -> Option<FileAttr> {
        let ino = self.ns.ino(dataset, node);
        Some(match &tree.node(node)?.kind {
            NodeKind::Dir { .. } => self.dir_attr(ino, dataset.created),
            NodeKind::File { size, .. } => {
                self.attr(ino, FileType::RegularFile, *size, dataset.created)
            }
        })
    }

    /// Attributes of `ino` and how long the kernel may keep them.
    pub fn attributes(&self, ino: u64) -> Result<(FileAttr, Duration), Errno> {
        match self.ns.resolve(ino).ok_or(Errno::ENOENT)? {
            Inode::Root => Ok((self.dir_attr(ino, self.started), self.refresh)),
            Inode::Node {
                dataset,
                node: TREE_ROOT,
            } => Ok((
                self.dir_attr(self.ns.ino(&dataset, TREE_ROOT), dataset.created),
                self.attr_ttl,
            )),
            Inode::Node { dataset, node } => {
                let tree = self.ns.tree(&dataset)?;
                let attr = self.node_attr(&dataset, &tree, node).ok_or(Errno::ENOENT)?;
                Ok((attr, self.attr_ttl))
            }
        }
    }

    fn lookup_inner(
        &self,
        parent: u64,
        name: &OsStr,
    ) -> Result<(Option<FileAttr>, Duration), Errno> {
        let Some(name) = name.to_str() else {
            return Ok((None, self.attr_ttl));
        };
        match self.ns.resolve(parent).ok_or(Errno::ENOENT)? {
            Inode::Root => {
                self.ns.refresh_if_stale();
                let attr = self
                    .ns
                    .dataset(name)
                    .map(|d| self.dir_attr(self.ns.ino(&d, TREE_ROOT), d.created));
                Ok((attr, self.refresh))
            }
            Inode::Node { dataset, node } => {
                let tree = self.ns.tree(&dataset)?;
                let child = tree.child(node, name);
                let attr = child.and_then(|c| self.node_attr(&dataset, &tree, c));
                Ok((attr, self.attr_ttl))
            }
        }
    }

    /// The entries of directory `ino` after `.` and `..`: (ino, kind, name).
    fn dir_entries(&self, ino: u64) -> Result<Vec<(u64, FileType, String)>, Errno> {
        match self.ns.resolve(ino).ok_or(Errno::ENOENT)? {
            Inode::Root => {
                self.ns.refresh_if_stale();
                Ok(self
                    .ns
                    .datasets()
                    .iter()
                    .map(|d| {
                        (
                            self.ns.ino(d, TREE_ROOT),
                            FileType::Directory,
                            d.name.clone(),
                        )
                    })
                    .collect())
            }
            Inode::Node { dataset, node } => {
                let tree = self.ns.tree(&dataset)?;
                let children = tree.children(node).ok_or(Errno::ENOTDIR)?;
                Ok(children
                    .iter()
                    .filter_map(|&c| {
                        let n = tree.node(c)?;
                        let kind = match n.kind {
                            NodeKind::Dir { .. } => FileType::Directory,
                            NodeKind::File { .. } => FileType::RegularFile,
                        };
                        Some((self.ns.ino(&dataset, c), kind, n.name.to_string()))
                    })
                    .collect())
            }
        }
    }

    /// Opens `ino`: the open file, its handle and size.
    fn open_inner(&self, ino: u64, flags: OpenFlags) -> Result<(Arc<Opened>, u64, u64), Errno> {
        if flags.acc_mode() != fuser::OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return Err(Errno::EROFS);
        }
        let Inode::Node { dataset, node } = self.ns.resolve(ino).ok_or(Errno::ENOENT)? else {
            return Err(Errno::EISDIR);
        };
        let tree = self.ns.tree(&dataset)?;
        let size = match tree.node(node).ok_or(Errno::ENOENT)?.kind {
            NodeKind::File { size, .. } => size,
            NodeKind::Dir { .. } => return Err(Errno::EISDIR),
        };
        let source = self.ns.source(&dataset)?;
        let file = self.reader.open(source, tree.path(node), size);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let opened = Arc::new(Opened {
            file,
            tree,
            node,
            state: AtomicU8::new(0),
        });
        self.files
            .lock()
            .expect("files poisoned")
            .insert(fh, Arc::clone(&opened));
        Ok((opened, fh, size))
    }

    /// The value of extended attribute `name` of `ino`.
    fn xattr(&self, ino: u64, name: &str) -> Result<String, Errno> {
        let Inode::Node { dataset, node } = self.ns.resolve(ino).ok_or(Errno::ENOENT)? else {
            return Err(Errno::NO_XATTR);
        };
        match name {
            XATTR_CLASS => Ok(dataset.class.clone()),
            XATTR_CRC32 => {
                let tree = self.ns.tree(&dataset)?;
                match tree.node(node).ok_or(Errno::ENOENT)?.kind {
                    NodeKind::File { crc32, .. } => Ok(format!("{crc32:08x}")),
                    NodeKind::Dir { .. } => Err(Errno::NO_XATTR),
                }
            }
            _ => Err(Errno::NO_XATTR),
        }
    }

    /// Pool capacity, free bytes and objects, cached for `STATFS_TTL`.
    pub fn pool_capacity(&self) -> Result<[u64; 3], Errno> {
        let mut cached = self.statfs.lock().expect("statfs poisoned");
        if let Some((at, v)) = *cached
            && at.elapsed() < STATFS_TTL
        {
            return Ok(v);
        }
        let status = self
            .runtime
            .block_on(within(STATFS_WAIT_MAX, self.client.status()));
        let status = status.map_err(|e| {
            tracing::warn!(error = %e, "statfs: cannot reach storaged");
            Errno::EIO
        })?;
        let objects = status.datasets.iter().map(|d| d.object_count).sum();
        let v = [status.capacity_bytes, status.free_bytes, objects];
        *cached = Some((Instant::now(), v));
        Ok(v)
    }

    /// The answer to a lookup of `name` in `parent`: its attributes (node
    /// 0 for a name that is not there, which the kernel keeps as a
    /// negative entry) and how long they hold.
    pub fn lookup_entry(&self, parent: u64, name: &OsStr) -> Result<(FileAttr, Duration), Errno> {
        let (attr, ttl) = self.lookup_inner(parent, name)?;
        let attr = attr.unwrap_or_else(|| {
            let mut none = self.dir_attr(0, self.started);
            none.ino = INodeNo(0);
            none
        });
        Ok((attr, ttl))
    }

    /// Opens `ino` for the kernel: the open file, its handle and the open
    /// flags to answer (direct I/O past `cached_file_bytes_max`).
    pub fn open_file(
        &self,
        ino: u64,
        flags: OpenFlags,
    ) -> Result<(Arc<Opened>, u64, FopenFlags), Errno> {
        let (opened, fh, size) = self.open_inner(ino, flags)?;
        let flags = if size > self.cached_file_bytes_max.load(Ordering::Relaxed) {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        Ok((opened, fh, flags))
    }

    /// After the open's answer, which the fetch's start would delay: a
    /// small file is fetched whole as it opens, unless its last such fetch
    /// went unused (the page cache held it). Not for a file closed already
    /// (it was read from the page cache in the meantime).
    pub fn after_open(&self, opened: &Opened, flags: FopenFlags) {
        if flags.contains(FopenFlags::FOPEN_KEEP_CACHE)
            && opened.tree.fetch_at_open(opened.node)
            && !opened.released()
            && self.reader.fetch_whole_at_open(&opened.file)
        {
            opened.note(FETCHED_AT_OPEN);
        }
    }

    /// The open file behind handle `fh`, about to be read.
    pub fn opened_for_read(&self, fh: u64) -> Result<Arc<Opened>, Errno> {
        let opened = self.files.lock().expect("files poisoned").get(&fh).cloned();
        let opened = opened.ok_or(Errno::EBADF)?;
        opened.note(READ);
        Ok(opened)
    }

    /// Starts reading `[offset, offset + size)` of `opened` (`Reader::start_read`).
    pub fn start_read(
        &self,
        opened: &Opened,
        offset: u64,
        size: u32,
        answer: &mut Answer<'_>,
    ) -> Pending {
        self.reader.start_read(&opened.file, offset, size, answer)
    }

    /// The kernel released handle `fh`.
    pub fn release_file(&self, fh: u64) {
        let opened = self.files.lock().expect("files poisoned").remove(&fh);
        if let Some(o) = opened {
            // Closed without a read reaching the mount after a fetch at
            // open: the page cache held it, so its next open does not
            // fetch.
            o.note(RELEASED);
        }
    }

    /// The entries of directory `ino` from readdir offset `offset` on:
    /// (ino, the offset of the entry after it, kind, name). Offsets are 1
    /// and 2 for `.` and `..`, then 3 + the child's index: stable across
    /// calls, as the tree never changes.
    pub fn dir_page(
        &self,
        ino: u64,
        offset: u64,
    ) -> Result<Vec<(u64, u64, FileType, String)>, Errno> {
        let entries = self.dir_entries(ino)?;
        let dots = [
            (ino, FileType::Directory, ".".to_string()),
            (ino, FileType::Directory, "..".to_string()),
        ];
        Ok(dots
            .into_iter()
            .chain(entries)
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .map(|(k, (ino, kind, name))| (ino, k as u64 + 1, kind, name))
            .collect())
    }

    /// The value of extended attribute `name` of `ino`, as bytes.
    pub fn xattr_value(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        self.xattr(ino, &name.to_string_lossy())
            .map(String::into_bytes)
    }

    /// The names of `ino`'s extended attributes, each NUL-terminated.
    pub fn xattr_names(&self, ino: u64) -> Vec<u8> {
        let mut names = Vec::new();
        for name in [XATTR_CRC32, XATTR_CLASS] {
            if self.xattr(ino, name).is_ok() {
                names.extend_from_slice(name.as_bytes());
                names.push(0);
            }
        }
        names
    }

    /// The runtime storaged's answers arrive on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// The kernel accepted FUSE over io_uring in the handshake.
    pub fn io_uring_accepted(&self) -> bool {
        self.io_uring.load(Ordering::Acquire)
    }
}

/// Answers `reply` with `size` bytes of `value` (or its length when
/// `size` is 0), as getxattr and listxattr want.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for MountFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_readahead(KERNEL_READAHEAD_BYTES_MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // Refused only for 0; fuser sets the congestion threshold to 3/4.
        let _ = config.set_max_background(self.kernel_background_max.max(1));
        if config
            .add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_err()
        {
            // A shared mmap of a direct file would fail (ENODEV): every
            // file through the page cache instead.
            tracing::info!(
                "the kernel cannot mmap direct-I/O files; every file uses the page cache"
            );
            self.cached_file_bytes_max
                .store(u64::MAX, Ordering::Relaxed);
        }
        // FUSE over io_uring where asked for and the kernel offers it
        // (`enable_uring`); its queues start once the mount is ready.
        if self.offer_io_uring
            && config
                .add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING)
                .is_ok()
        {
            // The ring's buffers are sized by the largest request: reads
            // and read-ahead up to 1 MiB; nothing is ever written.
            let _ = config.set_max_write(KERNEL_READAHEAD_BYTES_MAX);
            self.io_uring.store(true, Ordering::Release);
        }
        if let Some(ready) = self.on_ready.lock().expect("ready poisoned").take() {
            ready();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_entry(parent.0, name) {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attributes(ino.0) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_file(ino.0, flags) {
            Ok((opened, fh, flags)) => {
                reply.opened(FileHandle(fh), flags);
                self.after_open(&opened, flags);
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let opened = match self.opened_for_read(fh.0) {
            Ok(o) => o,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        let mut reply = Some(reply);
        let path = opened.path();
        let pending = self.start_read(&opened, offset, size, &mut |result| {
            if let Some(reply) = reply.take() {
                answer_read(reply, path, offset, size, result);
            }
        });
        match (pending, reply) {
            // Answered from this thread (read ahead already, or read
            // directly).
            (Pending::Answered, _) | (Pending::Wait(_), None) => {}
            // From the runtime: this thread takes the next request while
            // storaged reads.
            (Pending::Wait(read), Some(reply)) => {
                self.runtime.spawn(async move {
                    let result = read.await;
                    let result = result.as_ref().map(|b| &b[..]).map_err(Clone::clone);
                    answer_read(reply, opened.path(), offset, size, result);
                });
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_file(fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.dir_page(ino.0, offset) {
            Ok(page) => {
                for (ino, next, kind, name) in page {
                    if reply.add(INodeNo(ino), next, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    /// Nothing is buffered for writing. ENOSYS tells the kernel never to
    /// send FLUSH again: one request less at every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// No ioctls (a terminal check by `isatty`, say): ENOTTY.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.pool_capacity() {
            Ok([capacity, free, objects]) => {
                let block = 4096u64;
                reply.statfs(
                    capacity / block,
                    free / block,
                    free / block,
                    objects,
                    0,
                    block as u32,
                    storaged_proto::model::OBJECT_PATH_BYTES_MAX as u32,
                    block as u32,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.xattr_value(ino.0, name) {
            Ok(value) => reply_xattr(reply, size, &value),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, &self.xattr_names(ino.0));
    }

    // Everything below would change the tree: refused.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}
